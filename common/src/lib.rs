//! Shared pieces of the devshare backends.
