//! Fuzzes the .qdelta header parser: no input may panic, and any header the
//! strict parser accepts the reference safetensors reader accepts alike, with
//! the same tensors. Run with `make fuzz` (cargo +nightly fuzz run header).
#![no_main]

use _core::header::Header;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = _core::store::parse(data);
    if let Ok(h) = Header::parse(data) {
        let st = safetensors::SafeTensors::deserialize(data)
            .unwrap_or_else(|e| panic!("accepted by qdelta, refused by safetensors: {e:?}"));
        assert_eq!(st.len(), h.tensors.len());
        for t in &h.tensors {
            let v = st.tensor(&t.name).expect("listed tensor");
            assert_eq!(v.shape(), t.shape.as_slice());
            assert_eq!(v.data().len(), t.nbytes());
        }
    }
});
