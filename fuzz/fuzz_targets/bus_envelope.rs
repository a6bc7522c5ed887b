//! Fuzzes the bus envelope decoder (`wsbus::wire::envelope::Envelope::decode`, MessagePack).
//! The invariants are `check_envelope` in `fuzz/invariants.rs`, shared with
//! `tests/fuzz_regressions.rs`.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../invariants.rs"]
mod invariants;

fuzz_target!(|data: &[u8]| {
    let (name, check) = invariants::TARGETS[1];
    debug_assert_eq!(name, "bus_envelope");
    check(data);
});
