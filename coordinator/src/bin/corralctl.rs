use clap::Parser;

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::process::ExitCode {
    stop_quietly_on_a_closed_stdout();
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

/// `corralctl ... | head` closes the pipe early: stop quietly (exit 0, as
/// `backup download` does) instead of the panic `println!` raises on EPIPE.
/// Rust ignores SIGPIPE, and must keep ignoring it here: the gRPC client's
/// vectored socket writes would raise it on a connection the coordinator
/// reset.
fn stop_quietly_on_a_closed_stdout() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let message = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or_default();
        // "failed printing to stdout: Broken pipe (os error 32)"
        if message.starts_with("failed printing to stdout") && message.contains("(os error 32)") {
            std::process::exit(0);
        }
        default(info)
    }));
}
