//! Routing decisions, kept apart from IO: the plan (which targets, in which order), failure
//! classification, backoff, circuit breakers, the retry budget and latency tracking.

pub mod backoff;
pub mod breaker;
pub mod budget;
pub mod classify;
pub mod guard;
pub mod health;
pub mod plan;
pub mod policy;
pub mod rollout;
pub mod tokens;
