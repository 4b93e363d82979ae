//! Logging set-up shared by every warren process (CLI, proxy, server,
//! instance worker).

/// Logs to stderr without colours (journald and scripts read it), at debug
/// level when `verbose`.
pub fn init_logging(verbose: bool) {
    use tracing_subscriber::filter::{LevelFilter, Targets};
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let level = if verbose {
        LevelFilter::DEBUG
    } else {
        LevelFilter::INFO
    };
    // boringtun reports routine re-handshakes after idle periods as
    // warnings; warren's engine logs what matters about peers itself.
    let filter = Targets::new().with_default(level).with_target(
        "boringtun",
        if verbose {
            LevelFilter::DEBUG
        } else {
            LevelFilter::ERROR
        },
    );
    let _ = tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(false),
        )
        .with(filter)
        .try_init();
}
