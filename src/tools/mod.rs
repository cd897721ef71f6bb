//! The tools wing: programs for trying, measuring and attacking the worker. The product never
//! imports from here; tools import from the product.
//!
//! - [`fault_proxy`]: a TCP proxy that loses replies, freezes or resets connections on command,
//!   used by the fault tests and the `chaos` nemesis.

pub mod fault_proxy;
