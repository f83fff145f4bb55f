//! JSON merge patch (RFC 7386) and JSON patch (RFC 6902), as the API server applies them.
//! Strategic merge patch is served as a merge patch: for the maps it is used on here
//! (labels, annotations, status fields) the two agree.

use serde_json::Value;

pub fn merge(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(p) => {
            if !target.is_object() {
                *target = Value::Object(Default::default());
            }
            let t = target.as_object_mut().expect("made an object above");
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        other => *target = other.clone(),
    }
}

fn unescape(token: &str) -> String {
    token.replace("~1", "/").replace("~0", "~")
}

fn split_pointer(path: &str) -> Result<(Vec<String>, String), String> {
    let rest = path
        .strip_prefix('/')
        .ok_or_else(|| format!("invalid JSON pointer {path:?}"))?;
    let mut tokens: Vec<String> = rest.split('/').map(unescape).collect();
    let last = tokens.pop().unwrap_or_default();
    Ok((tokens, last))
}

fn parent<'a>(doc: &'a mut Value, tokens: &[String]) -> Result<&'a mut Value, String> {
    let mut cur = doc;
    for t in tokens {
        cur = match cur {
            Value::Object(m) => m.get_mut(t).ok_or_else(|| format!("path element {t:?} not found"))?,
            Value::Array(a) => {
                let i: usize = t.parse().map_err(|_| format!("bad array index {t:?}"))?;
                a.get_mut(i).ok_or_else(|| format!("array index {i} out of range"))?
            }
            _ => return Err(format!("cannot descend into {t:?}")),
        };
    }
    Ok(cur)
}

/// Applies RFC 6902 operations (add, remove, replace, test). On error the document is unchanged.
pub fn json_patch(doc: &mut Value, ops: &Value) -> Result<(), String> {
    let ops = ops.as_array().ok_or("a JSON patch must be an array of operations")?;
    let mut work = doc.clone();
    for op in ops {
        let kind = op["op"].as_str().ok_or("operation without \"op\"")?;
        let path = op["path"].as_str().ok_or("operation without \"path\"")?;
        let (tokens, last) = split_pointer(path)?;
        let p = parent(&mut work, &tokens)?;
        match (kind, p) {
            ("add" | "replace", Value::Object(m)) => {
                if kind == "replace" && !m.contains_key(&last) {
                    return Err(format!("replace: {path} does not exist"));
                }
                m.insert(last, op["value"].clone());
            }
            ("add", Value::Array(a)) => {
                let i = if last == "-" {
                    a.len()
                } else {
                    last.parse().map_err(|_| format!("bad index {last:?}"))?
                };
                if i > a.len() {
                    return Err(format!("add: index {i} out of range"));
                }
                a.insert(i, op["value"].clone());
            }
            ("replace", Value::Array(a)) => {
                let i: usize = last.parse().map_err(|_| format!("bad index {last:?}"))?;
                *a.get_mut(i).ok_or(format!("replace: index {i} out of range"))? = op["value"].clone();
            }
            ("remove", Value::Object(m)) => {
                m.remove(&last).ok_or(format!("remove: {path} does not exist"))?;
            }
            ("remove", Value::Array(a)) => {
                let i: usize = last.parse().map_err(|_| format!("bad index {last:?}"))?;
                if i >= a.len() {
                    return Err(format!("remove: index {i} out of range"));
                }
                a.remove(i);
            }
            ("test", p) => {
                let got = match p {
                    Value::Object(m) => m.get(&last),
                    Value::Array(a) => last.parse::<usize>().ok().and_then(|i| a.get(i)),
                    _ => None,
                };
                if got != Some(&op["value"]) {
                    return Err(format!("test failed at {path}"));
                }
            }
            (other, _) => return Err(format!("unsupported JSON patch operation {other:?} at {path}")),
        }
    }
    *doc = work;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn merge_patch_sets_and_removes_keys() {
        let mut doc = json!({"metadata": {"labels": {"app": "test", "tier": "web"}}});
        merge(
            &mut doc,
            &json!({"metadata": {"labels": {"app": "test-offline", "tier": null}}}),
        );
        assert_eq!(doc, json!({"metadata": {"labels": {"app": "test-offline"}}}));
    }

    #[test]
    fn json_patch_ops_and_escaping() {
        let mut doc = json!({"metadata": {"labels": {"app.kubernetes.io/name": "x"}}, "list": [1, 2]});
        json_patch(
            &mut doc,
            &json!([
                {"op": "test", "path": "/metadata/labels/app.kubernetes.io~1name", "value": "x"},
                {"op": "replace", "path": "/metadata/labels/app.kubernetes.io~1name", "value": "y"},
                {"op": "add", "path": "/list/-", "value": 3},
                {"op": "remove", "path": "/list/0"}
            ]),
        )
        .unwrap();
        assert_eq!(
            doc,
            json!({"metadata": {"labels": {"app.kubernetes.io/name": "y"}}, "list": [2, 3]})
        );
        let before = doc.clone();
        assert!(json_patch(&mut doc, &json!([{"op": "remove", "path": "/nope"}])).is_err());
        assert!(json_patch(&mut doc, &json!([{"op": "test", "path": "/list/0", "value": 9}])).is_err());
        assert_eq!(doc, before, "a failed patch changes nothing");
    }
}
