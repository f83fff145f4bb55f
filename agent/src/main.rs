use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    kube_converge::cli::run(kube_converge::config::Cli::parse()).await
}
