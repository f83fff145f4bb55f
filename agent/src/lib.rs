//! kube-converge: measures, per node, how long kube-proxy takes to program endpoint changes
//! into the kernel, and exports the lag.

pub mod expected;
pub mod model;
pub mod tracker;
