//! `warren-worker`: the instance worker alone (what `warren
//! instance-worker` runs), as a small binary so that each running instance
//! maps less code. Started by `warren up` (through the helper, or directly
//! for rootless instances and host tunnels), never by hand.

fn main() -> std::process::ExitCode {
    warren::instance::worker::run()
}
