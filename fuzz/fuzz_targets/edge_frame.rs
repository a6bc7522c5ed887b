//! Fuzzes the edge frame decoder (`wsbus::wire::client::parse_command_relaying`) and the frame
//! encoders. The invariants are `check_frame` in `fuzz/invariants.rs`, shared with
//! `tests/fuzz_regressions.rs`.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../invariants.rs"]
mod invariants;

fuzz_target!(|data: &[u8]| {
    let (name, check) = invariants::TARGETS[0];
    debug_assert_eq!(name, "edge_frame");
    check(data);
});
