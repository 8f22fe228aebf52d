//! The `flashsale` binary: everything lives in the library.
// The async state machines of every role, nested in `main`, run deeper than
// the compiler's default query depth.
#![recursion_limit = "256"]

use clap::Parser;

#[tokio::main]
async fn main() {
    flashsale::telemetry::init_logging();
    let code = flashsale::cli::run(flashsale::cli::Cli::parse()).await;
    std::process::exit(code);
}
