//! Many masks, one model: utterances of two tasks (different masks and heads over the fixture
//! model) batched together give what each task's model gives alone, through the library and the
//! `engine infer --masks NAME=DIR FILE@NAME` command line; bad routing is refused by name.

mod common;

use common::cli::{engine, fails_with, ok, s};
use common::{fixtures, rel_l2, two_tasks, utterances};
use s3router::backend::cpu::CpuBackend;
use s3router::infer::{BatchLimits, Chunking, Recognizer};
use s3router::multitask::MultiRecognizer;

#[test]
fn mixed_task_batches_match_each_task_alone() {
    mixed_batches_match_each_task_alone(false);
}

#[test]
fn mixed_task_batches_of_windows_match_each_task_alone() {
    mixed_batches_match_each_task_alone(true);
}

/// Whole files, or each file cut into windows (of 50 ms; the fixture model's frames are 2.5 ms).
fn mixed_batches_match_each_task_alone(windows: bool) {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = two_tasks(tmp.path());
    let be = CpuBackend;
    let dir = fixtures().join("base-like");
    let tasks = vec![("a".to_string(), a.clone()), ("b".to_string(), b.clone())];
    let mut multi = MultiRecognizer::load(&dir, &tasks, &be).unwrap();
    let chunking = windows.then(|| Chunking::from_seconds(0.05, 0.01, 0.015, &multi.model.config).unwrap());
    multi.decoding.chunking = chunking;
    let paths = utterances();
    // Interleaved tasks in one batch: a, b, a.
    let task_of = [0, 1, 0];
    let mut mixed = Vec::new();
    multi
        .run(&paths, &task_of, BatchLimits::default(), |u| {
            mixed.push(u);
            Ok(())
        })
        .unwrap();
    assert_eq!(mixed.iter().map(|u| u.index).collect::<Vec<_>>(), vec![0, 1, 2], "results in input order");
    assert!(mixed.iter().all(|u| (u.windows > 1) == windows), "{:?}", mixed.iter().map(|u| u.windows).collect::<Vec<_>>());
    for (task, set) in [(0, &a), (1, &b)] {
        let mut alone = Recognizer::load(&dir, None, Some(set), &be, false).unwrap();
        alone.decoding.chunking = chunking;
        let mut want = Vec::new();
        alone
            .run(&paths, BatchLimits::default(), |u| {
                want.push(u);
                Ok(())
            })
            .unwrap();
        for (u, w) in mixed.iter().zip(&want).filter(|(u, _)| task_of[u.index] == task) {
            let err = rel_l2(&u.logits, &w.logits);
            assert!(err <= 1e-5, "utterance {} under task {task}: rel L2 {err:.2e} against the task alone", u.index);
            assert_eq!(u.transcript, w.transcript);
        }
    }
    let m = multi.memory();
    assert!(m.shared() < m.copies(), "{m:?}");
}

#[test]
fn engine_infer_serves_several_mask_sets_and_names_bad_routing() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = two_tasks(tmp.path());
    let model = "tests/fixtures/base-like";
    let files: Vec<String> = utterances().iter().map(|p| p.display().to_string()).collect();
    let (ma, mb) = (format!("a={}", s(&a)), format!("b={}", s(&b)));
    let routed = [format!("{}@b", files[0]), format!("{}@a", files[1]), format!("{}@b", files[2])];
    let mut args = vec!["infer", "--model", model, "--masks", &ma, "--masks", &mb];
    args.extend(routed.iter().map(String::as_str));
    let out = engine(&args);
    ok(&out);
    assert!(String::from_utf8_lossy(&out.stderr).contains("finetuned copies would take"));
    let mixed: Vec<String> = String::from_utf8(out.stdout).unwrap().lines().map(str::to_string).collect();
    for (i, (file, set)) in [(&files[0], &b), (&files[1], &a), (&files[2], &b)].into_iter().enumerate() {
        let alone = engine(&["infer", "--model", model, "--masks", s(set), "--dense", file]);
        ok(&alone);
        assert_eq!(mixed[i], String::from_utf8(alone.stdout).unwrap().trim_end(), "file {i}");
    }
    let c = format!("{}@c", files[0]);
    fails_with(&engine(&["infer", "--model", model, "--masks", &ma, "--masks", &mb, &c]), "no --masks c=DIR was given");
    fails_with(&engine(&["infer", "--model", model, "--masks", &ma, "--masks", &mb, &files[0]]), "name each file's task as FILE@NAME");
    // Masks from another model: named with their task.
    let (other, x) = (format!("x={}", s(&a)), format!("{}@x", files[0]));
    fails_with(&engine(&["infer", "--model", "tests/fixtures/large-like", "--masks", &other, "--masks", &mb, &x]), "task x");
}
