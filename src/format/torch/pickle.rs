//! A pickle reader that builds a value tree and never runs anything.
//!
//! `torch.save` pickles its object with protocol 2, the tensors as
//! `torch._utils._rebuild_tensor_v2(persistent_id(...), ...)` calls. To find
//! the tensors we only need the shape of the object graph: globals are kept
//! as names, calls (`REDUCE`, `NEWOBJ`, `BUILD`) as inert nodes. The opcodes
//! of protocols 0–5 that such files use are understood; any other opcode is
//! an error, never a guess.

/// Index of a node in [`Pickle::nodes`].
pub type Id = usize;

#[derive(Debug, Clone, PartialEq)]
pub enum Node {
    None,
    Bool(bool),
    Int(i64),
    /// An integer too wide for i64 (LONG1/LONG4), as its little-endian bytes.
    BigInt(Vec<u8>),
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    List(Vec<Id>),
    Tuple(Vec<Id>),
    Dict(Vec<(Id, Id)>),
    Global {
        module: String,
        name: String,
    },
    /// The argument of BINPERSID: torch's storage reference.
    PersistentId(Id),
    /// `func(*args)`, with what BUILD, SETITEMS and APPENDS later added to it
    /// (an `OrderedDict()` call gets its items this way).
    Call {
        func: Id,
        args: Id,
        state: Option<Id>,
        items: Vec<(Id, Id)>,
        appended: Vec<Id>,
    },
}

#[derive(Debug, Clone)]
pub struct Pickle {
    pub nodes: Vec<Node>,
    pub root: Id,
}

impl Pickle {
    pub fn node(&self, id: Id) -> &Node {
        &self.nodes[id]
    }

    pub fn str(&self, id: Id) -> Option<&str> {
        match self.node(id) {
            Node::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn int(&self, id: Id) -> Option<i64> {
        match self.node(id) {
            Node::Int(i) => Some(*i),
            Node::Bool(b) => Some(i64::from(*b)),
            _ => None,
        }
    }

    /// The items of a tuple or list.
    pub fn seq(&self, id: Id) -> Option<&[Id]> {
        match self.node(id) {
            Node::Tuple(v) | Node::List(v) => Some(v),
            _ => None,
        }
    }

    /// The (module, name) of a global.
    pub fn global(&self, id: Id) -> Option<(&str, &str)> {
        match self.node(id) {
            Node::Global { module, name } => Some((module, name)),
            _ => None,
        }
    }

    /// The entries of a dict, or of an `OrderedDict()` call filled by SETITEMS.
    pub fn dict(&self, id: Id) -> Option<&[(Id, Id)]> {
        match self.node(id) {
            Node::Dict(items) => Some(items),
            Node::Call { func, items, .. }
                if self.global(*func) == Some(("collections", "OrderedDict")) =>
            {
                Some(items)
            }
            _ => None,
        }
    }

    /// A dict entry by string key.
    pub fn get(&self, dict: Id, key: &str) -> Option<Id> {
        self.dict(dict)?
            .iter()
            .find(|&&(k, _)| self.str(k) == Some(key))
            .map(|&(_, v)| v)
    }
}

/// A dataclass field: objects pickle their `__dict__` as BUILD state (or
/// `(dict, slots)` for classes with slots).
pub fn attr(p: &Pickle, obj: Id, name: &str) -> Option<Id> {
    let Node::Call { state: Some(s), .. } = p.node(obj) else {
        return None;
    };
    if let Some(found) = p.get(*s, name) {
        return Some(found);
    }
    let parts = p.seq(*s)?;
    parts.iter().find_map(|&part| p.get(part, name))
}

/// `torch.Size((a, b))`, pickled as `REDUCE(torch.Size, ((a, b),))`.
pub fn torch_size(p: &Pickle, id: Id) -> Result<Vec<u64>, String> {
    let dims = match p.node(id) {
        Node::Call { func, args, .. } if p.global(*func) == Some(("torch", "Size")) => p
            .seq(*args)
            .and_then(|a| a.first().copied())
            .and_then(|d| p.seq(d)),
        Node::Tuple(d) | Node::List(d) => Some(d.as_slice()),
        _ => None,
    }
    .ok_or("not a torch.Size")?;
    dims.iter()
        .map(|&d| {
            p.int(d)
                .and_then(|d| u64::try_from(d).ok())
                .ok_or_else(|| "a dimension is not a non-negative int".to_string())
        })
        .collect()
}

/// A cursor over the pickle bytes.
struct Input<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Input<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.bytes.len())
            .ok_or_else(|| format!("pickle ends inside an opcode argument at byte {}", self.pos))?;
        let out = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(out)
    }
    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, String> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().expect("2")))
    }
    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4")))
    }
    fn line(&mut self) -> Result<&'a str, String> {
        let rest = &self.bytes[self.pos..];
        let len = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or("pickle ends inside a GLOBAL name")?;
        let text = std::str::from_utf8(&rest[..len]).map_err(|_| "GLOBAL name is not UTF-8")?;
        self.pos += len + 1;
        Ok(text)
    }
    fn string(&mut self, len: usize) -> Result<String, String> {
        String::from_utf8(self.take(len)?.to_vec())
            .map_err(|_| format!("string before byte {} is not UTF-8", self.pos))
    }
}

/// The machine's state: the node arena, the stack, mark positions, memo.
#[derive(Default)]
struct Machine {
    nodes: Vec<Node>,
    stack: Vec<Id>,
    marks: Vec<usize>,
    memo: std::collections::HashMap<u32, Id>,
}

impl Machine {
    fn push(&mut self, node: Node) {
        self.nodes.push(node);
        self.stack.push(self.nodes.len() - 1);
    }
    fn pop(&mut self) -> Result<Id, String> {
        if self.marks.last().is_some_and(|&m| m >= self.stack.len()) {
            return Err("opcode pops past a MARK".into());
        }
        self.stack
            .pop()
            .ok_or_else(|| "stack underflow".to_string())
    }
    fn top(&self) -> Result<Id, String> {
        self.stack
            .last()
            .copied()
            .ok_or_else(|| "stack underflow".to_string())
    }
    fn pop_mark(&mut self) -> Result<Vec<Id>, String> {
        let mark = self.marks.pop().ok_or("no MARK to pop to")?;
        Ok(self.stack.split_off(mark))
    }
    fn pop_n(&mut self, n: usize) -> Result<Vec<Id>, String> {
        let floor = self.marks.last().copied().unwrap_or(0);
        if self.stack.len() < floor + n {
            return Err("stack underflow".into());
        }
        Ok(self.stack.split_off(self.stack.len() - n))
    }
    fn memo_get(&self, key: u32) -> Result<Id, String> {
        self.memo
            .get(&key)
            .copied()
            .ok_or_else(|| format!("memo key {key} read before it was written"))
    }
    fn set_items(&mut self, target: Id, pairs: Vec<Id>) -> Result<(), String> {
        if !pairs.len().is_multiple_of(2) {
            return Err("SETITEMS with an odd number of items".into());
        }
        let pairs = pairs.chunks(2).map(|p| (p[0], p[1]));
        match &mut self.nodes[target] {
            Node::Dict(items) | Node::Call { items, .. } => items.extend(pairs),
            other => return Err(format!("SETITEMS on {}", kind(other))),
        }
        Ok(())
    }
    fn append(&mut self, target: Id, values: Vec<Id>) -> Result<(), String> {
        match &mut self.nodes[target] {
            Node::List(items)
            | Node::Call {
                appended: items, ..
            } => items.extend(values),
            other => return Err(format!("APPENDS on {}", kind(other))),
        }
        Ok(())
    }
}

fn kind(node: &Node) -> &'static str {
    match node {
        Node::None => "None",
        Node::Bool(_) => "a bool",
        Node::Int(_) | Node::BigInt(_) => "an int",
        Node::Float(_) => "a float",
        Node::Str(_) => "a string",
        Node::Bytes(_) => "bytes",
        Node::List(_) => "a list",
        Node::Tuple(_) => "a tuple",
        Node::Dict(_) => "a dict",
        Node::Global { .. } => "a global",
        Node::PersistentId(_) => "a persistent id",
        Node::Call { .. } => "an object",
    }
}

/// Parses a whole pickle; `bytes` must end right after its STOP.
pub fn parse(bytes: &[u8]) -> Result<Pickle, String> {
    let mut input = Input { bytes, pos: 0 };
    let mut m = Machine::default();
    loop {
        let at = input.pos;
        let op = input.u8()?;
        step(&mut m, &mut input, op)
            .map_err(|e| format!("pickle opcode {op:#04x} at byte {at}: {e}"))?;
        if op == b'.' {
            break;
        }
    }
    if input.pos != bytes.len() {
        return Err(format!(
            "{} bytes follow the pickle's STOP",
            bytes.len() - input.pos
        ));
    }
    let root = m.pop()?;
    if !m.stack.is_empty() || !m.marks.is_empty() {
        return Err("pickle leaves values on the stack at STOP".into());
    }
    Ok(Pickle {
        nodes: m.nodes,
        root,
    })
}

/// Runs one opcode.
fn step(m: &mut Machine, input: &mut Input<'_>, op: u8) -> Result<(), String> {
    match op {
        0x80 => {
            let proto = input.u8()?;
            if proto > 5 {
                return Err(format!("protocol {proto} is newer than 5"));
            }
        }
        0x95 => {
            input.take(8)?; // FRAME: a length hint only
        }
        b'.' => {}
        b'(' => m.marks.push(m.stack.len()),
        b'N' => m.push(Node::None),
        0x88 => m.push(Node::Bool(true)),
        0x89 => m.push(Node::Bool(false)),
        b'K' => {
            let v = input.u8()?;
            m.push(Node::Int(i64::from(v)));
        }
        b'M' => {
            let v = input.u16()?;
            m.push(Node::Int(i64::from(v)));
        }
        b'J' => {
            let v = input.u32()? as i32;
            m.push(Node::Int(i64::from(v)));
        }
        0x8a | 0x8b => {
            let len = if op == 0x8a {
                usize::from(input.u8()?)
            } else {
                input.u32()? as usize
            };
            let le = input.take(len)?;
            m.push(long(le));
        }
        b'G' => {
            let v = f64::from_be_bytes(input.take(8)?.try_into().expect("8"));
            m.push(Node::Float(v));
        }
        b'X' => {
            let len = input.u32()? as usize;
            let s = input.string(len)?;
            m.push(Node::Str(s));
        }
        0x8c => {
            let len = usize::from(input.u8()?);
            let s = input.string(len)?;
            m.push(Node::Str(s));
        }
        b'U' | b'C' => {
            let len = usize::from(input.u8()?);
            let b = input.take(len)?.to_vec();
            m.push(Node::Bytes(b));
        }
        b'T' | b'B' => {
            let len = input.u32()? as usize;
            let b = input.take(len)?.to_vec();
            m.push(Node::Bytes(b));
        }
        b'}' => m.push(Node::Dict(Vec::new())),
        b']' => m.push(Node::List(Vec::new())),
        b')' => m.push(Node::Tuple(Vec::new())),
        b't' => {
            let items = m.pop_mark()?;
            m.push(Node::Tuple(items));
        }
        b'l' => {
            let items = m.pop_mark()?;
            m.push(Node::List(items));
        }
        b'd' => {
            let items = m.pop_mark()?;
            if !items.len().is_multiple_of(2) {
                return Err("DICT with an odd number of items".into());
            }
            m.push(Node::Dict(items.chunks(2).map(|p| (p[0], p[1])).collect()));
        }
        0x85..=0x87 => {
            let items = m.pop_n(usize::from(op - 0x84))?;
            m.push(Node::Tuple(items));
        }
        b'q' => {
            let key = u32::from(input.u8()?);
            m.memo.insert(key, m.top()?);
        }
        b'r' => {
            let key = input.u32()?;
            m.memo.insert(key, m.top()?);
        }
        0x94 => {
            let key = m.memo.len() as u32;
            m.memo.insert(key, m.top()?);
        }
        b'h' => {
            let id = m.memo_get(u32::from(input.u8()?))?;
            m.stack.push(id);
        }
        b'j' => {
            let id = m.memo_get(input.u32()?)?;
            m.stack.push(id);
        }
        b'0' => {
            m.pop()?;
        }
        b'1' => {
            m.pop_mark()?;
        }
        b'2' => {
            let top = m.top()?;
            m.stack.push(top);
        }
        b'c' => {
            let module = input.line()?.to_string();
            let name = input.line()?.to_string();
            m.push(Node::Global { module, name });
        }
        0x93 => {
            let [module, name] = m.pop_n(2)?[..] else {
                unreachable!()
            };
            let (Node::Str(module), Node::Str(name)) = (&m.nodes[module], &m.nodes[name]) else {
                return Err("STACK_GLOBAL needs two strings".into());
            };
            let node = Node::Global {
                module: module.clone(),
                name: name.clone(),
            };
            m.push(node);
        }
        b'Q' => {
            let pid = m.pop()?;
            m.push(Node::PersistentId(pid));
        }
        b'R' | 0x81 => {
            let args = m.pop()?;
            let func = m.pop()?;
            m.push(call(func, args));
        }
        b'b' => {
            let state = m.pop()?;
            let target = m.top()?;
            match &mut m.nodes[target] {
                Node::Call { state: slot, .. } => *slot = Some(state),
                other => return Err(format!("BUILD on {}", kind(other))),
            }
        }
        b's' => {
            let pair = m.pop_n(2)?;
            let target = m.top()?;
            m.set_items(target, pair)?;
        }
        b'u' => {
            let pairs = m.pop_mark()?;
            let target = m.top()?;
            m.set_items(target, pairs)?;
        }
        b'a' => {
            let value = m.pop()?;
            let target = m.top()?;
            m.append(target, vec![value])?;
        }
        b'e' => {
            let values = m.pop_mark()?;
            let target = m.top()?;
            m.append(target, values)?;
        }
        _ => return Err("opcode not supported".into()),
    }
    Ok(())
}

fn call(func: Id, args: Id) -> Node {
    Node::Call {
        func,
        args,
        state: None,
        items: Vec::new(),
        appended: Vec::new(),
    }
}

/// A LONG1/LONG4 value: two's complement, little-endian.
fn long(le: &[u8]) -> Node {
    if le.len() <= 8 {
        let fill = if le.last().is_some_and(|&b| b & 0x80 != 0) {
            0xFF
        } else {
            0
        };
        let mut buf = [fill; 8];
        buf[..le.len()].copy_from_slice(le);
        Node::Int(i64::from_le_bytes(buf))
    } else {
        Node::BigInt(le.to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // `pickle.dumps({'a': [1, 2.5, None], 'b': (True, 'x')}, protocol=2)`
    const SAMPLE: &[u8] =
        b"\x80\x02}q\x00(X\x01\x00\x00\x00aq\x01]q\x02(K\x01G@\x04\x00\x00\x00\x00\x00\x00Ne\
X\x01\x00\x00\x00bq\x03\x88X\x01\x00\x00\x00xq\x04\x86q\x05u.";

    #[test]
    fn builds_the_value_tree() {
        let p = parse(SAMPLE).unwrap();
        let a = p.get(p.root, "a").unwrap();
        let items = p.seq(a).unwrap();
        assert_eq!(p.node(items[0]), &Node::Int(1));
        assert_eq!(p.node(items[1]), &Node::Float(2.5));
        assert_eq!(p.node(items[2]), &Node::None);
        let b = p.seq(p.get(p.root, "b").unwrap()).unwrap();
        assert_eq!(p.node(b[0]), &Node::Bool(true));
        assert_eq!(p.str(b[1]), Some("x"));
    }

    #[test]
    fn refuses_truncated_and_unknown_input() {
        for cut in 1..SAMPLE.len() {
            assert!(parse(&SAMPLE[..cut]).is_err(), "cut at {cut}");
        }
        let mut unknown = SAMPLE.to_vec();
        unknown[2] = b'i'; // INST: runs code by name
        assert!(parse(&unknown).unwrap_err().contains("not supported"));
        let mut trailing = SAMPLE.to_vec();
        trailing.push(b'N');
        assert!(parse(&trailing).is_err());
    }

    #[test]
    fn longs_are_twos_complement() {
        assert_eq!(long(&[0xff]), Node::Int(-1));
        assert_eq!(long(&[0x00, 0x01]), Node::Int(256));
        assert_eq!(long(&[]), Node::Int(0));
    }
}
