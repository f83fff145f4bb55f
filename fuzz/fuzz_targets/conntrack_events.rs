#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| kube_converge::fuzzing::conntrack_events(data));
