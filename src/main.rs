//! The `flashsale` binary: everything lives in the library.
// The async state machines of every role, nested in `main`, run deeper than
// the compiler's default query depth.
#![recursion_limit = "256"]

use clap::Parser;

// The request path allocates and frees small buffers on every request
// across threads; glibc's malloc took about a fifth of the server's CPU
// under the reserve benchmark (perf). mimalloc's thread-local free lists
// cost a fraction of that.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() {
    flashsale::telemetry::init_logging();
    let code = flashsale::cli::run(flashsale::cli::Cli::parse()).await;
    std::process::exit(code);
}
