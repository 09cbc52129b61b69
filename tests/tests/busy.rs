//! No false failover when the machine is merely busy: both cores loaded by
//! `stress-ng --cpu 2` under a writer, with the default timing, for 90 s in
//! `make test` and five minutes in `make bench` (`CORRAL_BUSY_SECONDS`).
//! In a test binary of its own, so the load disturbs no other test (cargo
//! runs test binaries one after another).

use corral_tests::ha;
use corral_tests::stress::Stress;
use corral_tests::Lab;

#[test]
fn both_cores_loaded_cause_no_failover_and_no_fence() {
    let secs: u64 = corral_tests::env_num("CORRAL_BUSY_SECONDS", 90);
    let mut lab = Lab::start(3).unwrap();
    let creds = ha::cluster(&mut lab, "busy", &[]).unwrap();
    let stress = Stress::cpu(2).unwrap();
    ha::hold_steady(&lab, &creds, "busy", secs, "stress-ng --cpu 2");
    drop(stress);
}
