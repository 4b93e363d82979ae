//! Test helper: tries to connect to each Unix socket path in its arguments
//! and prints one line per path: `PATH connected` or `PATH refused: ERROR`.
//! Used to check what a spawned program can reach on the host.

fn main() {
    for path in std::env::args().skip(1) {
        match std::os::unix::net::UnixStream::connect(&path) {
            Ok(_) => println!("{path} connected"),
            Err(e) => println!("{path} refused: {e}"),
        }
    }
}
