//! Fuzzes the NAR reader: any input must be accepted or refused without a panic, hang or
//! unbounded allocation, and an accepted NAR must render back byte for byte (NARs are
//! canonical, so anything the reader accepts has exactly one spelling).
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime")
    })
}

fuzz_target!(|data: &[u8]| {
    runtime().block_on(async {
        // A fresh in-memory store per input keeps memory flat across runs.
        let store = granary::store::open("memory://")
            .await
            .expect("memory store");
        if let Ok(imp) = granary::views::nar::import_nar(&store, data).await {
            let mut out = Vec::new();
            let sum = granary::views::nar::write_nar(&store, &imp.node, &mut out)
                .await
                .expect("an imported NAR renders");
            assert!(out == data, "accepted NAR does not render back identically");
            assert_eq!(sum.nar_size, imp.nar_size);
            assert_eq!(sum.nar_sha256, imp.nar_sha256);
        }
    });
});
