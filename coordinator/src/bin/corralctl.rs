use clap::Parser;

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::process::ExitCode {
    // `corralctl ... | head` closes the pipe early: like cat or ls, stop
    // quietly (killed by SIGPIPE) instead of the panic println! raises when
    // Rust's default of ignoring SIGPIPE turns the write into EPIPE. Sockets
    // are unaffected: Rust sends on them with MSG_NOSIGNAL.
    // SAFETY: called first thing, before any other thread exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    corral_proto::tls::install_crypto_provider();
    let cli = corral_coordinator::cli::Cli::parse();
    match corral_coordinator::cli::main_with(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
