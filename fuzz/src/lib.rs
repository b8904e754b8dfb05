//! What several fuzz targets share: descriptors over Unix sockets and counting open
//! descriptors ([`fds`]), guest memory laid out by the fuzzer ([`guest`]) and seed inputs for
//! the committed corpora ([`seed`]).

pub mod fds;
pub mod guest;
pub mod relay;
pub mod seed;
