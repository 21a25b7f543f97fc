//! `tenure-sim`: the deterministic simulator.

fn main() -> std::process::ExitCode {
    eprintln!("tenure-sim: the simulator is not built yet; see ARCHITECTURE.md");
    std::process::ExitCode::FAILURE
}
