//! The parts of a Nix derivation (`.drv`, ATerm text) that decide its references: output
//! paths, input derivations and input sources.
//!
//! Nix records a `.drv`'s references as its inputs only; its own output paths appear in the
//! text too but are not references. A reference scan of the text cannot tell the two apart,
//! so `import-store` without Nix's database reads the inputs from here.

/// Largest `.drv` accepted (real ones are a few KiB; big environments reach a few MiB).
pub const MAX_DRV_BYTES: usize = 64 << 20;
/// Nesting allowed in the ATerm (real derivations use 3 levels).
const MAX_DEPTH: usize = 8;

/// What a derivation names, as full store paths.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Derivation {
    /// `(output name, path)`; the path is empty for floating content-addressed outputs.
    pub outputs: Vec<(String, String)>,
    pub input_drvs: Vec<String>,
    pub input_srcs: Vec<String>,
}

impl Derivation {
    /// Every store path the derivation depends on: its input derivations and sources.
    pub fn inputs(&self) -> impl Iterator<Item = &str> {
        self.input_drvs
            .iter()
            .chain(&self.input_srcs)
            .map(String::as_str)
    }
}

/// One ATerm value.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Term {
    Str(String),
    List(Vec<Term>),
    Tuple(Vec<Term>),
}

struct Parser<'a> {
    s: &'a [u8],
    pos: usize,
}

impl Parser<'_> {
    fn err(&self, what: &str) -> String {
        format!("bad derivation at byte {}: {what}", self.pos)
    }

    fn eat(&mut self, c: u8) -> Result<(), String> {
        if self.s.get(self.pos) == Some(&c) {
            self.pos += 1;
            Ok(())
        } else {
            Err(self.err(&format!("expected '{}'", c as char)))
        }
    }

    fn string(&mut self) -> Result<String, String> {
        self.eat(b'"')?;
        let mut out = Vec::new();
        loop {
            let Some(&c) = self.s.get(self.pos) else {
                return Err(self.err("unterminated string"));
            };
            self.pos += 1;
            match c {
                b'"' => break,
                b'\\' => {
                    let Some(&e) = self.s.get(self.pos) else {
                        return Err(self.err("unterminated escape"));
                    };
                    self.pos += 1;
                    out.push(match e {
                        b'n' => b'\n',
                        b'r' => b'\r',
                        b't' => b'\t',
                        other => other,
                    });
                }
                other => out.push(other),
            }
        }
        String::from_utf8(out).map_err(|_| self.err("string is not UTF-8"))
    }

    /// Items up to `close`, separated by commas.
    fn items(&mut self, close: u8, depth: usize) -> Result<Vec<Term>, String> {
        let mut out = Vec::new();
        if self.s.get(self.pos) == Some(&close) {
            self.pos += 1;
            return Ok(out);
        }
        loop {
            out.push(self.term(depth + 1)?);
            match self.s.get(self.pos) {
                Some(b',') => self.pos += 1,
                Some(&c) if c == close => {
                    self.pos += 1;
                    return Ok(out);
                }
                _ => return Err(self.err(&format!("expected ',' or '{}'", close as char))),
            }
        }
    }

    fn term(&mut self, depth: usize) -> Result<Term, String> {
        if depth > MAX_DEPTH {
            return Err(self.err("nested too deeply"));
        }
        match self.s.get(self.pos) {
            Some(b'"') => Ok(Term::Str(self.string()?)),
            Some(b'[') => {
                self.pos += 1;
                Ok(Term::List(self.items(b']', depth)?))
            }
            Some(b'(') => {
                self.pos += 1;
                Ok(Term::Tuple(self.items(b')', depth)?))
            }
            _ => Err(self.err("expected a string, list or tuple")),
        }
    }
}

fn list(t: &Term, what: &str) -> Result<Vec<Term>, String> {
    match t {
        Term::List(v) => Ok(v.clone()),
        _ => Err(format!("bad derivation: {what} is not a list")),
    }
}

fn string(t: &Term, what: &str) -> Result<String, String> {
    match t {
        Term::Str(s) => Ok(s.clone()),
        _ => Err(format!("bad derivation: {what} is not a string")),
    }
}

/// Parses a derivation's text (`Derive(outputs, inputDrvs, inputSrcs, system, builder, args,
/// env)`). Only the first three fields are interpreted; the rest must be well formed.
pub fn parse(text: &[u8]) -> Result<Derivation, String> {
    if text.len() > MAX_DRV_BYTES {
        return Err(format!("derivation is over {MAX_DRV_BYTES} bytes"));
    }
    let body = text
        .strip_prefix(b"Derive(")
        .ok_or("bad derivation: does not start with 'Derive('")?;
    let mut p = Parser { s: body, pos: 0 };
    let fields = p
        .items(b')', 0)
        .map_err(|e| e.replace("byte ", "byte +7 "))?;
    if p.pos != body.len() {
        return Err("bad derivation: bytes after the closing ')'".into());
    }
    if fields.len() != 7 {
        return Err(format!("bad derivation: {} fields, want 7", fields.len()));
    }
    let mut d = Derivation::default();
    for o in list(&fields[0], "outputs")? {
        let Term::Tuple(t) = o else {
            return Err("bad derivation: an output is not a tuple".into());
        };
        if t.len() != 4 {
            return Err("bad derivation: an output does not have 4 fields".into());
        }
        d.outputs
            .push((string(&t[0], "output name")?, string(&t[1], "output path")?));
    }
    for i in list(&fields[1], "input derivations")? {
        let Term::Tuple(t) = i else {
            return Err("bad derivation: an input derivation is not a tuple".into());
        };
        let path = t.first().ok_or("bad derivation: empty input derivation")?;
        d.input_drvs.push(string(path, "input derivation")?);
    }
    for s in list(&fields[2], "input sources")? {
        d.input_srcs.push(string(&s, "input source")?);
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DRV: &str = r#"Derive([("out","/nix/store/0000000000000000000000000000000a-x","","")],[("/nix/store/0000000000000000000000000000000b-dep.drv",["out"])],["/nix/store/0000000000000000000000000000000c-src"],"x86_64-linux","/bin/sh",["-c","echo \"hi\" > $out\n"],[("builder","/bin/sh"),("out","/nix/store/0000000000000000000000000000000a-x")])"#;

    #[test]
    fn reads_outputs_and_inputs() {
        let d = parse(DRV.as_bytes()).unwrap();
        assert_eq!(
            d.outputs,
            vec![(
                "out".to_string(),
                "/nix/store/0000000000000000000000000000000a-x".to_string()
            )]
        );
        assert_eq!(
            d.inputs().collect::<Vec<_>>(),
            vec![
                "/nix/store/0000000000000000000000000000000b-dep.drv",
                "/nix/store/0000000000000000000000000000000c-src"
            ]
        );
    }

    #[test]
    fn refuses_malformed_text() {
        for bad in [
            "",
            "Derive(",
            "Derive([],[],[])",
            "Derive([],[],[],\"s\",\"b\",[],[])x",
            "Derive([(\"out\")],[],[],\"s\",\"b\",[],[])",
            "Derive([],[],[],\"s\",\"b\",[],[(\"unterminated)])",
            "Derive([],[],[\"a\"\"b\"],\"s\",\"b\",[],[])",
            "Drv([],[],[],\"s\",\"b\",[],[])",
        ] {
            assert!(parse(bad.as_bytes()).is_err(), "{bad:?}");
        }
        let deep = format!("Derive({}", "[".repeat(100));
        assert!(parse(deep.as_bytes()).unwrap_err().contains("deeply"));
    }
}
