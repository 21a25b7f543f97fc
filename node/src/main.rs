//! `tenure`: the collector and exporter binary.

fn main() -> std::process::ExitCode {
    eprintln!("tenure: the node (collector, exporter, demo) is not built yet; see ARCHITECTURE.md");
    std::process::ExitCode::FAILURE
}
