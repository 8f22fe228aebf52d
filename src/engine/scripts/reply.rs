//! Decoding of the scripts' replies: each script's reply type implements
//! `redis::FromRedisValue` on these helpers and refuses any shape its
//! script's contract does not allow, naming the script and what came.

use redis::{ParsingError, Value};

/// A reply of bulk strings (and integers, read as their decimal text).
pub(crate) fn strings(script: &str, v: Value) -> Result<Vec<String>, ParsingError> {
    let Value::Array(items) = v else {
        return Err(unknown(script, &v));
    };
    items
        .into_iter()
        .map(|item| match item {
            Value::BulkString(b) => String::from_utf8(b)
                .map_err(|_| ParsingError::from(format!("{script}: a reply field is not UTF-8"))),
            Value::SimpleString(s) => Ok(s),
            Value::Int(i) => Ok(i.to_string()),
            other => Err(unknown(script, &other)),
        })
        .collect()
}

/// A `{tag, field, ...}` reply split into its tag and fields.
pub(crate) fn tagged(script: &str, v: Value) -> Result<(String, Vec<String>), ParsingError> {
    let mut all = strings(script, v)?;
    if all.is_empty() {
        return Err(format!("{script}: an empty reply").into());
    }
    let tag = all.remove(0);
    Ok((tag, all))
}

/// The error for a reply of a shape the script's contract does not allow.
pub(crate) fn unknown(script: &str, what: &dyn std::fmt::Debug) -> ParsingError {
    format!("{script}: a reply its contract does not allow: {what:?}").into()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A reply of bulk strings, as a script sends it.
    pub(crate) fn reply(fields: &[&str]) -> Value {
        Value::Array(
            fields
                .iter()
                .map(|f| Value::BulkString(f.as_bytes().to_vec()))
                .collect(),
        )
    }

    #[test]
    fn shapes_outside_the_contract_are_refused_by_name() {
        let v = Value::Array(vec![Value::BulkString(b"ok".to_vec()), Value::Int(3)]);
        assert_eq!(
            tagged("pay", v).unwrap(),
            ("ok".to_owned(), vec!["3".to_owned()])
        );
        let err = strings("pay", Value::Int(1)).unwrap_err();
        assert!(err.to_string().contains("pay"), "{err}");
        assert!(tagged("pay", Value::Array(vec![])).is_err());
    }
}
