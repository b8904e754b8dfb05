//! Shared pieces of the devshare vhost-user backends: daemon lifecycle ([`daemon`]),
//! split-ring access ([`ring`]) and descriptor-chain access ([`chain`]), configuration ([`config`]),
//! counters ([`stats`]) and rate-limited logging of guest-caused events ([`ratelimit`]).

pub mod chain;
pub mod config;
pub mod daemon;
pub mod pit;
pub mod ratelimit;
pub mod relay;
pub mod ring;
pub mod stats;

/// The `log` crate, for [`warn_limited!`] in crates that name it differently or not at all.
#[doc(hidden)]
pub use log as __log;

/// Starts logging to stderr; `RUST_LOG` overrides the default level (`info`).
pub fn init_logging() {
    let _ = env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_timestamp_millis()
        .try_init();
}
