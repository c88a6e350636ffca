//! The XML under the SOAP calls: a small element tree for what the server
//! sends, and a writer for what we send.
//!
//! Responses are parsed with namespaces resolved: vcsim writes `xsi:type` as
//! `XMLSchema-instance:type`, real vCenters as `xsi:type`, and both mean the
//! attribute `type` in the XML Schema instance namespace. Only that
//! namespace's `type` is lifted into [`Node::xsi_type`]; other attributes are
//! kept by local name (vim25 uses unqualified `type` on MoRefs).

use quick_xml::events::{BytesStart, Event};
use quick_xml::name::ResolveResult;
use quick_xml::NsReader;

use crate::error::Error;
use crate::moref::MoRef;

const XSI_NS: &[u8] = b"http://www.w3.org/2001/XMLSchema-instance";

/// Deeper nesting than this is refused: vim25 objects nest a dozen levels,
/// and a bound keeps a hostile document from exhausting the stack when a
/// tree is written back out.
const MAX_DEPTH: usize = 128;

/// One element of a parsed document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    /// Local name (no prefix).
    pub name: String,
    /// The `xsi:type`, without its prefix (`VirtualDisk`, `string`).
    pub xsi_type: Option<String>,
    /// Other attributes by local name.
    pub attrs: Vec<(String, String)>,
    /// Text directly inside this element, unescaped.
    pub text: String,
    pub children: Vec<Node>,
}

impl Node {
    pub fn new(name: &str) -> Self {
        Node { name: name.to_string(), xsi_type: None, attrs: Vec::new(), text: String::new(), children: Vec::new() }
    }

    /// A leaf with text.
    pub fn leaf(name: &str, text: &str) -> Self {
        let mut n = Node::new(name);
        n.text = text.to_string();
        n
    }

    pub fn child(&self, name: &str) -> Option<&Node> {
        self.children.iter().find(|c| c.name == name)
    }

    pub fn children_named<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Node> + 'a {
        self.children.iter().filter(move |c| c.name == name)
    }

    /// The child, or a protocol error naming what was missing.
    pub fn req(&self, name: &str) -> Result<&Node, Error> {
        self.child(name).ok_or_else(|| Error::Protocol(format!("<{}> has no <{}>", self.name, name)))
    }

    /// Text of a child element.
    pub fn text_of(&self, name: &str) -> Option<&str> {
        self.child(name).map(|c| c.text.as_str())
    }

    /// Text of a child element, or a protocol error.
    pub fn req_text(&self, name: &str) -> Result<&str, Error> {
        self.req(name).map(|c| c.text.as_str())
    }

    /// A numeric child, or a protocol error naming the bad value.
    pub fn parse_of<T: std::str::FromStr>(&self, name: &str) -> Result<Option<T>, Error> {
        match self.child(name) {
            None => Ok(None),
            Some(c) => {
                c.text.trim().parse().map(Some).map_err(|_| {
                    Error::Protocol(format!("<{}> in <{}> is not a number: {:?}", name, self.name, c.text))
                })
            }
        }
    }

    pub fn attr(&self, name: &str) -> Option<&str> {
        self.attrs.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    /// This element read as a managed object reference (`type` attribute and
    /// text).
    pub fn moref(&self) -> Result<MoRef, Error> {
        let kind = self
            .attr("type")
            .ok_or_else(|| Error::Protocol(format!("<{}> is not a managed object reference (no type)", self.name)))?;
        if self.text.is_empty() {
            return Err(Error::Protocol(format!("<{}> is an empty managed object reference", self.name)));
        }
        Ok(MoRef::new(kind, &self.text))
    }

    /// A child read as a managed object reference.
    pub fn moref_of(&self, name: &str) -> Result<Option<MoRef>, Error> {
        self.child(name).map(Node::moref).transpose()
    }

    /// Appends `node` after the last child named any of `after` (in schema
    /// order, the element just before it), or at the end when none is there.
    pub fn insert_after_last_of(&mut self, after: &[&str], node: Node) {
        let at = self.children.iter().rposition(|c| after.contains(&c.name.as_str()));
        match at {
            Some(i) => self.children.insert(i + 1, node),
            None => self.children.push(node),
        }
    }
}

/// Parses a whole document and returns its root element.
pub fn parse(doc: &[u8]) -> Result<Node, Error> {
    let mut reader = NsReader::from_reader(doc);
    let mut buf = Vec::new();
    let mut stack: Vec<Node> = Vec::new();
    let bad = |what: String| Error::Protocol(format!("the server sent malformed XML: {what}"));
    loop {
        let (_, event) = reader.read_resolved_event_into(&mut buf).map_err(|e| bad(e.to_string()))?;
        match event {
            Event::Start(start) => {
                if stack.len() >= MAX_DEPTH {
                    return Err(bad(format!("elements nest deeper than {MAX_DEPTH}")));
                }
                let node = open_node(&reader, &start).map_err(bad)?;
                stack.push(node);
            }
            Event::Empty(start) => {
                let node = open_node(&reader, &start).map_err(bad)?;
                match stack.last_mut() {
                    Some(parent) => parent.children.push(node),
                    None => return Ok(node),
                }
            }
            Event::End(_) => {
                let Some(node) = stack.pop() else {
                    return Err(bad("a closing tag without an opening one".into()));
                };
                match stack.last_mut() {
                    Some(parent) => parent.children.push(node),
                    None => return Ok(node),
                }
            }
            Event::Text(t) => {
                if let Some(top) = stack.last_mut() {
                    let s = t.unescape().map_err(|e| bad(e.to_string()))?;
                    top.text.push_str(&s);
                }
            }
            Event::CData(t) => {
                if let Some(top) = stack.last_mut() {
                    top.text.push_str(&String::from_utf8_lossy(&t));
                }
            }
            Event::Eof => return Err(bad("the document ended before its root element closed".into())),
            _ => {}
        }
        buf.clear();
    }
}

fn open_node(reader: &NsReader<&[u8]>, start: &BytesStart<'_>) -> Result<Node, String> {
    let name = String::from_utf8_lossy(start.local_name().as_ref()).into_owned();
    let mut node = Node::new(&name);
    for attr in start.attributes() {
        let attr = attr.map_err(|e| e.to_string())?;
        let key = attr.key;
        if key.as_namespace_binding().is_some() {
            continue;
        }
        let (ns, local) = reader.resolve_attribute(key);
        let value = attr.unescape_value().map_err(|e| e.to_string())?.into_owned();
        let local = String::from_utf8_lossy(local.as_ref()).into_owned();
        match ns {
            ResolveResult::Bound(ns) if ns.as_ref() == XSI_NS => {
                if local == "type" {
                    // "xsd:string" → "string"; vim25 types carry no prefix.
                    let t = value.rsplit(':').next().unwrap_or(&value).to_string();
                    node.xsi_type = Some(t);
                }
            }
            ResolveResult::Unknown(p) => {
                return Err(format!("attribute prefix {:?} is not declared", String::from_utf8_lossy(&p)))
            }
            _ => node.attrs.push((local, value)),
        }
    }
    Ok(node)
}

/// Escapes text for element content and attribute values.
pub fn escape(s: &str) -> std::borrow::Cow<'_, str> {
    quick_xml::escape::escape(s)
}

/// Builds the body of a request. Element names are ours (constants);
/// everything that came from a caller or the server goes through [`escape`].
#[derive(Debug, Default)]
pub struct Writer {
    out: String,
}

impl Writer {
    pub fn new() -> Self {
        Writer::default()
    }

    pub fn finish(self) -> String {
        self.out
    }

    pub fn open(&mut self, name: &str) -> &mut Self {
        self.out.push('<');
        self.out.push_str(name);
        self.out.push('>');
        self
    }

    /// Opens an element with an `xsi:type` (the envelope declares `xsi`).
    pub fn open_typed(&mut self, name: &str, xsi_type: &str) -> &mut Self {
        self.out.push('<');
        self.out.push_str(name);
        self.out.push_str(" xsi:type=\"");
        self.out.push_str(&escape(xsi_type));
        self.out.push_str("\">");
        self
    }

    pub fn close(&mut self, name: &str) -> &mut Self {
        self.out.push_str("</");
        self.out.push_str(name);
        self.out.push('>');
        self
    }

    pub fn text(&mut self, name: &str, value: &str) -> &mut Self {
        self.open(name);
        self.out.push_str(&escape(value));
        self.close(name)
    }

    /// A leaf with an `xsi:type`, for `anyType` slots such as
    /// `OptionValue.value`.
    pub fn typed_text(&mut self, name: &str, xsi_type: &str, value: &str) -> &mut Self {
        self.open_typed(name, xsi_type);
        self.out.push_str(&escape(value));
        self.close(name)
    }

    pub fn moref(&mut self, name: &str, m: &MoRef) -> &mut Self {
        self.out.push('<');
        self.out.push_str(name);
        self.out.push_str(" type=\"");
        self.out.push_str(&escape(&m.kind));
        self.out.push_str("\">");
        self.out.push_str(&escape(&m.value));
        self.close(name)
    }

    /// Writes a parsed tree back out, as when an import spec the server made
    /// is handed back to it.
    pub fn node(&mut self, n: &Node) -> &mut Self {
        self.out.push('<');
        self.out.push_str(&n.name);
        if let Some(t) = &n.xsi_type {
            // vim25 types are unprefixed; the few XML Schema ones are xsd:.
            let t = if is_xsd_type(t) { format!("xsd:{t}") } else { t.clone() };
            self.out.push_str(" xsi:type=\"");
            self.out.push_str(&escape(&t));
            self.out.push('"');
        }
        for (k, v) in &n.attrs {
            self.out.push(' ');
            self.out.push_str(k);
            self.out.push_str("=\"");
            self.out.push_str(&escape(v));
            self.out.push('"');
        }
        self.out.push('>');
        self.out.push_str(&escape(&n.text));
        for c in &n.children {
            self.node(c);
        }
        self.close(&n.name)
    }
}

fn is_xsd_type(t: &str) -> bool {
    matches!(
        t,
        "string" | "boolean" | "int" | "long" | "short" | "byte" | "float" | "double" | "dateTime" | "base64Binary"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xsi_type_is_found_by_namespace_not_prefix() {
        let doc = br#"<a xmlns:XMLSchema-instance="http://www.w3.org/2001/XMLSchema-instance" xmlns:x="http://www.w3.org/2001/XMLSchema-instance">
            <v XMLSchema-instance:type="xsd:string">one</v><w x:type="VirtualDisk" type="ignored"/></a>"#;
        let n = parse(doc).expect("parses");
        assert_eq!(n.children[0].xsi_type.as_deref(), Some("string"));
        assert_eq!(n.children[1].xsi_type.as_deref(), Some("VirtualDisk"));
        assert_eq!(n.children[1].attr("type"), Some("ignored"));
    }

    #[test]
    fn text_is_unescaped_and_written_back_escaped() {
        let n = parse(b"<a k=\"&quot;x&quot;\">1 &lt; 2 &amp; 3</a>").expect("parses");
        assert_eq!(n.text, "1 < 2 & 3");
        assert_eq!(n.attr("k"), Some("\"x\""));
        let mut w = Writer::new();
        w.node(&n);
        assert_eq!(parse(w.finish().as_bytes()).expect("re-parses"), n);
    }

    #[test]
    fn malformed_and_truncated_documents_are_errors_not_panics() {
        for doc in [&b"<a><b></a>"[..], b"<a>", b"", b"<a x:y=\"1\"/>", b"<<>"] {
            assert!(parse(doc).is_err(), "{:?}", String::from_utf8_lossy(doc));
        }
        let deep = "<a>".repeat(MAX_DEPTH + 1);
        assert!(parse(deep.as_bytes()).is_err());
    }
}
