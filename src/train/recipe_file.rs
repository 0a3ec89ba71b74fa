//! `--config FILE`: a recipe read back as command-line flags, so that a run's
//! `train_config.json` (or any JSON object of flag names and values) starts another run, and
//! flags typed after it override it, as fairseq configs take `key=value` overrides.

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde_json::Value;

/// The flags `recipe` sets for a subcommand that learns `learn` (`"masks"`: `engine train`;
/// `"weights"`: `engine finetune`) and takes the long flags `accepts` knows. Keys are flag
/// names with `_` or `-`; `null` and `false` set nothing, `true` gives the bare flag. `file`
/// names the recipe in messages.
pub fn recipe_flags(recipe: &Value, learn: &str, accepts: impl Fn(&str) -> bool, file: &Path) -> Result<Vec<String>> {
    let f = file.display();
    let object = recipe.as_object().with_context(|| format!("--config {f}: not a JSON object of flags and values"))?;
    let mut flags = Vec::new();
    for (key, value) in object {
        let flag = key.replace('_', "-");
        match (flag.as_str(), value) {
            ("learn", Value::String(l)) if l == learn => continue,
            ("learn", Value::String(l)) => {
                let command = if l == "masks" { "engine train" } else { "engine finetune" };
                bail!("--config {f}: this recipe learns {l}: run it with `{command}`")
            }
            ("prune", Value::Null) => continue,
            ("prune", _) => bail!("--config {f}: a pruning recipe: run `engine prune` with its --method and --sparsity"),
            _ => {}
        }
        if !accepts(&flag) {
            bail!("--config {f}: \"{key}\" is not an option of this command");
        }
        match value {
            Value::Null | Value::Bool(false) => {}
            Value::Bool(true) => flags.push(format!("--{flag}")),
            Value::Number(n) => flags.extend([format!("--{flag}"), n.to_string()]),
            Value::String(s) => flags.extend([format!("--{flag}"), s.clone()]),
            other => bail!("--config {f}: \"{key}\" is {other}, not a number, string or true/false"),
        }
    }
    Ok(flags)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_become_flags_and_mismatches_are_named() {
        let accepts = |f: &str| ["lr", "keep-head", "vocab", "mask-time-prob", "model"].contains(&f);
        let file = Path::new("r.json");
        let recipe = serde_json::json!({"learn": "masks", "prune": null, "lr": 5e-5, "keep_head": true, "vocab": null,
                                        "mask-time-prob": 0.65, "model": "m"});
        let mut got = recipe_flags(&recipe, "masks", accepts, file).unwrap();
        got.sort();
        let mut want: Vec<String> =
            ["--keep-head", "--lr", "0.00005", "--mask-time-prob", "0.65", "--model", "m"].map(String::from).to_vec();
        want.sort();
        assert_eq!(got, want);
        let err = |r: Value| recipe_flags(&r, "masks", accepts, file).unwrap_err().to_string();
        assert!(err(serde_json::json!({"learn": "weights"})).contains("engine finetune"));
        assert!(err(serde_json::json!({"prune": {"method": "omp"}})).contains("engine prune"));
        assert!(err(serde_json::json!({"lr_typo": 1})).contains("\"lr_typo\" is not an option"));
        assert!(err(serde_json::json!({"lr": [1]})).contains("not a number"));
        assert!(err(serde_json::json!([1])).contains("not a JSON object"));
    }
}
