#![deny(unsafe_code)]
use clap::Parser;

// The agent's heap is many small long-lived entries plus large short-lived peaks (full reads,
// initial lists). glibc leaves the freed peaks scattered among live entries, where they stay
// resident; jemalloc returns them (bench/RESULTS.md, Footprint).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's start-up options: purge freed pages from a background thread, so an idle agent
/// gives its last peak back too (by default jemalloc purges only while allocating); one arena,
/// not four per core: the agent's work is one task at a time, and every arena keeps its own
/// partly used pages (lower peak and RSS in the footprint benchmark). `_RJEM_MALLOC_CONF`
/// overrides these at run time.
#[used]
#[allow(unsafe_code)] // jemalloc reads its options from this exported `const char *`
#[export_name = "_rjem_malloc_conf"]
static MALLOC_CONF: &u8 = &b"background_thread:true,narenas:1,dirty_decay_ms:5000,muzzy_decay_ms:5000\0"[0];

#[tokio::main]
async fn main() -> std::process::ExitCode {
    match kube_converge::cli::run(kube_converge::config::Cli::parse()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // A sentence, never a debug dump; the backtrace only when asked for.
            eprintln!("error: {}", kube_converge::cli::describe_error(&e));
            if std::env::var_os("RUST_BACKTRACE").is_some_and(|v| v != "0") {
                eprintln!("\n{}", e.backtrace());
            }
            std::process::ExitCode::FAILURE
        }
    }
}
