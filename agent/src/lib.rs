//! kube-converge: measures, per node, how long kube-proxy takes to program endpoint changes
//! into the kernel, and exports the lag.

pub mod dataplane;
pub mod expected;
pub mod k8s;
pub mod model;
pub mod netns;
pub mod tracker;
