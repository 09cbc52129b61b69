use clap::Parser;

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::process::ExitCode {
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
