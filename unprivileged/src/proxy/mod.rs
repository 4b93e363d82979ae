//! SOCKS5 and HTTP proxy intake, routing rules and relay.
//! (Being built; see issue "Unprivileged proxy".)

pub mod cli;
