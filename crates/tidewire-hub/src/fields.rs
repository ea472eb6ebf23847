//! Strict reading of JSON objects field by field, with errors for people.
//!
//! The client protocol's commands ([`crate::protocol`]) and the HTTP API's
//! bodies ([`crate::api`]) are JSON objects with a fixed set of fields. They
//! are read here one field at a time, so that an error names the field and
//! says what it must be (`"limit" must be a non-negative integer`,
//! `"channel" is required (a string)`, `unknown field "chanel"; fields:
//! channel, …`), never the JSON parser's internals ("invalid type: string,
//! expected usize at line 1 column 26").
//!
//! Reading is bounded by the input: an object is split into its members
//! (the values kept as borrowed raw JSON), and each field is parsed only when
//! asked for. `null` counts as absent for optional fields (JavaScript
//! clients send it for unset values).

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;

/// Longest part of a client's input (a field or command name) repeated in
/// an error message.
const MAX_ECHO: usize = 64;

/// A name from the input, quoted for an error message, cut when long.
pub(crate) fn quoted(name: &str) -> String {
    if name.chars().count() <= MAX_ECHO {
        return format!("{name:?}");
    }
    let cut: String = name.chars().take(MAX_ECHO).collect();
    format!("{:?}…", cut)
}

/// What kind of JSON value a text holds, from its first byte (the text is
/// valid JSON), for messages like "got an array".
pub(crate) fn kind_of(json: &str) -> &'static str {
    match json.trim_start().as_bytes().first() {
        Some(b'{') => "an object",
        Some(b'[') => "an array",
        Some(b'"') => "a string",
        Some(b't' | b'f') => "a boolean",
        Some(b'n') => "null",
        _ => "a number",
    }
}

/// Why a text is not a JSON object, in words (no parser internals).
fn not_an_object(text: &str, e: &serde_json::Error) -> String {
    use serde_json::error::Category;
    let at = if e.line() > 1 {
        format!("line {}, column {}", e.line(), e.column())
    } else {
        format!("column {}", e.column())
    };
    match e.classify() {
        Category::Eof => format!("the JSON ends too early (at {at})"),
        Category::Data => format!("not a JSON object: got {}", kind_of(text)),
        Category::Syntax | Category::Io => format!("not valid JSON (at {at})"),
    }
}

/// The members of a JSON object, in order, values as raw JSON.
#[derive(Debug)]
struct Members<'a>(Vec<(Cow<'a, str>, &'a RawValue)>);

/// A key, borrowed from the input unless it had escapes.
struct Key<'a>(Cow<'a, str>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a key")
            }
            fn visit_borrowed_str<E: de::Error>(self, s: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(s)))
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(s.to_owned())))
            }
        }
        d.deserialize_str(V)
    }
}

impl<'de> Deserialize<'de> for Members<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Members<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Members<'de>, A::Error> {
                let mut members = Vec::new();
                while let Some(Key(key)) = map.next_key()? {
                    members.push((key, map.next_value::<&RawValue>()?));
                }
                Ok(Members(members))
            }
        }
        d.deserialize_map(V)
    }
}

/// A JSON object being read field by field. Field names in messages carry
/// the object's place (`"since.offset"`).
#[derive(Debug)]
pub(crate) struct Object<'a> {
    /// `""` at the top, `"since."` inside the field `since`.
    prefix: String,
    members: Vec<(Cow<'a, str>, &'a RawValue)>,
}

impl<'a> Object<'a> {
    /// Splits a text holding one JSON object into its members.
    ///
    /// # Errors
    /// Not valid JSON, or not an object: a message saying so, with the
    /// place of a syntax error.
    pub(crate) fn parse(text: &'a str) -> Result<Object<'a>, String> {
        match serde_json::from_str::<Members<'a>>(text) {
            Ok(Members(members)) => Ok(Object {
                prefix: String::new(),
                members,
            }),
            Err(e) => Err(not_an_object(text, &e)),
        }
    }

    /// The name of a field as messages show it.
    fn field(&self, name: &str) -> String {
        format!("\"{}{name}\"", self.prefix)
    }

    /// The members, in order.
    pub(crate) fn members(&self) -> impl Iterator<Item = (&str, &'a RawValue)> + '_ {
        self.members.iter().map(|(k, v)| (k.as_ref(), *v))
    }

    /// Refuses fields not in `known`, and fields given twice.
    ///
    /// # Errors
    /// The first unknown or repeated field, and the fields there are.
    pub(crate) fn only(&self, known: &[&str]) -> Result<(), String> {
        for (at, (key, _)) in self.members.iter().enumerate() {
            if !known.contains(&key.as_ref()) {
                let fields = if known.is_empty() {
                    "it takes no fields".to_owned()
                } else {
                    format!("fields: {}", known.join(", "))
                };
                let key = format!("{}{key}", self.prefix);
                return Err(format!("unknown field {}; {fields}", quoted(&key)));
            }
            if self.members[..at].iter().any(|(k, _)| k == key) {
                return Err(format!("{} is given twice", self.field(key)));
            }
        }
        Ok(())
    }

    /// A field's raw JSON, `null` included; None when absent.
    pub(crate) fn raw(&self, name: &str) -> Option<&'a RawValue> {
        self.members
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, value)| *value)
    }

    /// A field's raw JSON, `null` counting as absent.
    fn present(&self, name: &str) -> Option<&'a RawValue> {
        self.raw(name).filter(|v| v.get() != "null")
    }

    /// A field that must be there.
    fn required<T>(
        &self,
        name: &str,
        what: &str,
        read: impl FnOnce(&Self, &str) -> Result<Option<T>, String>,
    ) -> Result<T, String> {
        read(self, name)?.ok_or_else(|| format!("{} is required ({what})", self.field(name)))
    }

    /// An optional field read by serde, with a message naming the field
    /// and its kind when it has another.
    fn typed<T: Deserialize<'a>>(&self, name: &str, what: &str) -> Result<Option<T>, String> {
        let Some(raw) = self.present(name) else {
            return Ok(None);
        };
        serde_json::from_str(raw.get())
            .map(Some)
            .map_err(|_| format!("{} must be {what}", self.field(name)))
    }

    /// An optional string field.
    pub(crate) fn string(&self, name: &str) -> Result<Option<String>, String> {
        self.typed(name, "a string")
    }

    /// A string field that must be there.
    pub(crate) fn required_string(&self, name: &str) -> Result<String, String> {
        self.required(name, "a string", Self::string)
    }

    /// An optional non-negative integer field.
    pub(crate) fn u64(&self, name: &str) -> Result<Option<u64>, String> {
        self.typed(name, "a non-negative integer")
    }

    /// A non-negative integer field that must be there.
    pub(crate) fn required_u64(&self, name: &str) -> Result<u64, String> {
        self.required(name, "a non-negative integer", Self::u64)
    }

    /// An optional boolean field.
    pub(crate) fn bool(&self, name: &str) -> Result<Option<bool>, String> {
        self.typed(name, "true or false")
    }

    /// A field of any JSON value (`null` too) that must be there.
    pub(crate) fn required_value(&self, name: &str) -> Result<Box<RawValue>, String> {
        self.raw(name)
            .map(RawValue::to_owned)
            .ok_or_else(|| format!("{} is required (any JSON value)", self.field(name)))
    }

    /// An optional field of any JSON value; `null` counts as absent.
    pub(crate) fn value(&self, name: &str) -> Option<Box<RawValue>> {
        self.present(name).map(RawValue::to_owned)
    }

    /// An optional object field, to be read in turn.
    pub(crate) fn object(&self, name: &str) -> Result<Option<Object<'a>>, String> {
        let Some(raw) = self.present(name) else {
            return Ok(None);
        };
        match serde_json::from_str::<Members<'a>>(raw.get()) {
            Ok(Members(members)) => Ok(Some(Object {
                prefix: format!("{}{name}.", self.prefix),
                members,
            })),
            Err(_) => Err(format!(
                "{} must be an object (got {})",
                self.field(name),
                kind_of(raw.get())
            )),
        }
    }

    /// An array of strings that must be there, with at most `max` of them.
    /// Entries past `max` are only counted (not kept), so a long array
    /// costs no memory.
    ///
    /// # Errors
    /// [`ListError::Invalid`] for anything but an array of strings,
    /// [`ListError::TooLong`] with the length when it has more than `max`.
    pub(crate) fn required_strings(
        &self,
        name: &str,
        max: usize,
    ) -> Result<Vec<String>, ListError> {
        let what = "an array of strings";
        let Some(raw) = self.present(name) else {
            return Err(ListError::Invalid(format!(
                "{} is required ({what})",
                self.field(name)
            )));
        };
        let mut de = serde_json::Deserializer::from_str(raw.get());
        match de.deserialize_seq(BoundedStrings { max }) {
            Ok(Ok(list)) => Ok(list),
            Ok(Err(len)) => Err(ListError::TooLong(len)),
            Err(_) => Err(ListError::Invalid(format!(
                "{} must be {what}",
                self.field(name)
            ))),
        }
    }
}

/// Why an array field was refused.
#[derive(Debug)]
pub(crate) enum ListError {
    /// Not an array of strings; the message names the field.
    Invalid(String),
    /// More entries than allowed: the length.
    TooLong(usize),
}

/// Reads an array of strings, keeping at most `max`; more: `Err(length)`.
struct BoundedStrings {
    max: usize,
}

impl<'de> Visitor<'de> for BoundedStrings {
    type Value = Result<Vec<String>, usize>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an array of strings")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut list = Vec::new();
        while list.len() < self.max {
            match seq.next_element::<String>()? {
                Some(s) => list.push(s),
                None => return Ok(Ok(list)),
            }
        }
        let mut len = list.len();
        while seq.next_element::<IgnoredAny>()?.is_some() {
            len += 1;
        }
        Ok(if len > self.max { Err(len) } else { Ok(list) })
    }
}

/// Whether a key is `id`, read without copying it (an escaped key is
/// compared where the parser unescaped it).
struct IsId(bool);

impl<'de> Deserialize<'de> for IsId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = IsId;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a key")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<IsId, E> {
                Ok(IsId(s == "id"))
            }
        }
        d.deserialize_str(V)
    }
}

/// The `id` of a command line, read without keeping anything: the id a
/// full parse ([`crate::protocol::parse_command`]) would echo, 0 when the
/// line is not a JSON object or its id is missing, invalid or repeated.
pub(crate) fn peek_id(line: &str) -> u64 {
    struct IdOf;
    impl<'de> Visitor<'de> for IdOf {
        type Value = u64;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<u64, A::Error> {
            let mut id = None;
            let mut valid = true;
            while let Some(IsId(is_id)) = map.next_key()? {
                let value = map.next_value::<&RawValue>()?;
                if is_id {
                    if id.is_some() {
                        valid = false;
                    }
                    id = Some(serde_json::from_str::<u64>(value.get()).ok());
                }
            }
            Ok(match id {
                Some(Some(id)) if valid => id,
                _ => 0,
            })
        }
    }
    let mut de = serde_json::Deserializer::from_str(line);
    de.deserialize_map(IdOf)
        .and_then(|id| de.end().map(|()| id))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_the_field_and_what_it_must_be() {
        let o = Object::parse(r#"{"limit":"ten","n":-1,"b":1,"s":2,"x":null}"#).unwrap();
        assert_eq!(
            o.u64("limit").unwrap_err(),
            "\"limit\" must be a non-negative integer"
        );
        assert_eq!(
            o.u64("n").unwrap_err(),
            "\"n\" must be a non-negative integer"
        );
        assert_eq!(o.bool("b").unwrap_err(), "\"b\" must be true or false");
        assert_eq!(o.string("s").unwrap_err(), "\"s\" must be a string");
        assert_eq!(o.string("x").unwrap(), None, "null is absent");
        assert_eq!(
            o.required_string("channel").unwrap_err(),
            "\"channel\" is required (a string)"
        );
        assert_eq!(
            o.only(&["limit", "n", "b", "s"]).unwrap_err(),
            "unknown field \"x\"; fields: limit, n, b, s"
        );
        let o = Object::parse(r#"{"since":{"offset":1.5},"list":[1]}"#).unwrap();
        let since = o.object("since").unwrap().unwrap();
        assert_eq!(
            since.required_u64("offset").unwrap_err(),
            "\"since.offset\" must be a non-negative integer"
        );
        assert_eq!(
            since.required_string("epoch").unwrap_err(),
            "\"since.epoch\" is required (a string)"
        );
        assert_eq!(
            o.object("list").unwrap_err(),
            "\"list\" must be an object (got an array)"
        );
        assert!(
            matches!(o.required_strings("list", 5), Err(ListError::Invalid(m)) if m == "\"list\" must be an array of strings")
        );
    }

    #[test]
    fn repeated_fields_and_texts_that_are_not_objects() {
        let o = Object::parse(r#"{"a":1,"a":2}"#).unwrap();
        assert_eq!(o.only(&["a"]).unwrap_err(), "\"a\" is given twice");
        assert_eq!(
            Object::parse("[1]").err().unwrap(),
            "not a JSON object: got an array"
        );
        assert_eq!(
            Object::parse(r#"{"a":1,}"#).err().unwrap(),
            "not valid JSON (at column 8)"
        );
        assert_eq!(
            Object::parse(r#"{"a":"#).err().unwrap(),
            "the JSON ends too early (at column 5)"
        );
        assert_eq!(
            Object::parse("{\n\"a\" 1}").err().unwrap(),
            "not valid JSON (at line 2, column 5)"
        );
        let long = "k".repeat(100);
        let text = format!("{{\"{long}\":1}}");
        let e = Object::parse(&text).unwrap().only(&[]).unwrap_err();
        assert!(e.starts_with("unknown field \"kkkk") && e.ends_with("…; it takes no fields"));
        assert!(e.len() < 120, "{e}");
    }

    #[test]
    fn escaped_keys_are_read_like_plain_ones() {
        let o = Object::parse(r#"{"\u0069d":7}"#).unwrap();
        assert_eq!(o.u64("id").unwrap(), Some(7));
        assert_eq!(peek_id(r#"{"\u0069d":7,"ping":{}}"#), 7);
    }

    #[test]
    fn string_lists_are_bounded() {
        let o = Object::parse(r#"{"c":["a","b","c"]}"#).unwrap();
        assert_eq!(o.required_strings("c", 3).unwrap(), ["a", "b", "c"]);
        assert!(matches!(
            o.required_strings("c", 2),
            Err(ListError::TooLong(3))
        ));
    }

    #[test]
    fn peek_id_reads_only_a_valid_single_id() {
        assert_eq!(peek_id(r#"{"id":5,"ping":{}}"#), 5);
        assert_eq!(peek_id(r#"{"ping":{},"id":6}"#), 6);
        assert_eq!(peek_id(r#"{"id":5,"id":5,"ping":{}}"#), 0);
        assert_eq!(peek_id(r#"{"id":"5","ping":{}}"#), 0);
        assert_eq!(peek_id(r#"{"id":5,"ping":{}} x"#), 0);
        assert_eq!(peek_id(r#"{"id":5,"ping":{"#), 0);
        assert_eq!(peek_id("[5]"), 0);
    }
}
