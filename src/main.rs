//! The `flashsale` binary: everything lives in the library.

use clap::Parser;

#[tokio::main]
async fn main() {
    flashsale::telemetry::init_logging();
    let code = flashsale::cli::run(flashsale::cli::Cli::parse()).await;
    std::process::exit(code);
}
