//! The third link: complete answers kept by request, served fresh while their route's `ttl`
//! lasts, served stale (and marked so) when every target failed, and one upstream call for
//! identical concurrent requests. No answer is ever made up: only complete successes are kept.

pub mod answer;
pub mod flight;
pub mod key;
pub mod store;

pub use answer::{Assembler, Stored};
pub use flight::{Flights, Joined, Landed, Leader, Waiter};
pub use key::{Key, Mode};
pub use store::{Cache, Entry, Lookup, Policy};
