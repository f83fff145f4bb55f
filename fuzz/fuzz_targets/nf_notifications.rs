#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| kube_converge::fuzzing::nf_notifications(data));
