//! Training pieces against PyTorch (tools/make_train_fixtures.py).

mod common;

use common::fixtures;
use s3router::train::adam::Adam;

#[test]
fn adam_follows_torch_optim_adam() {
    let f: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(fixtures().join("train.json")).unwrap()).unwrap();
    let a = &f["adam"];
    let floats = |v: &serde_json::Value| v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect::<Vec<_>>();
    let mut p = floats(&a["start"]);
    let mut adam = Adam::new(&[p.len()]);
    for (g, lr) in a["grads"].as_array().unwrap().iter().zip(a["lrs"].as_array().unwrap()) {
        adam.update(&mut [&mut p], &[&floats(g)], lr.as_f64().unwrap());
    }
    for (got, want) in p.iter().zip(floats(&a["end"])) {
        assert!((got - want).abs() <= 1e-6 * want.abs().max(1.0), "{got} vs torch {want}");
    }
}
