//! A restricted unpickler for PyTorch weight files (`torch.save` of a state dict).
//!
//! It builds data and nothing else: of Python's callables it knows only the few a state dict is
//! made of (an `OrderedDict`, `torch._utils._rebuild_tensor_v2`, `_rebuild_parameter`) and
//! refuses any other, as `torch.load(weights_only=True)` does, so a weights file cannot run code.
//! Storages come back as PyTorch's persistent ids name them; `crate::model::torch_bin` finds
//! their bytes in the archive.

use std::collections::HashMap;

use anyhow::{bail, ensure, Context, Result};

/// A pickled value, as far as weight files use them.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    Tuple(Vec<Value>),
    List(Vec<Value>),
    /// Keys and values in insertion order (`dict` and `OrderedDict`).
    Dict(Vec<(Value, Value)>),
    /// A module attribute named by `GLOBAL` (only ever used as a storage's type, or called).
    Global(String, String),
    Storage(Storage),
    /// `_rebuild_tensor_v2(storage, offset, size, stride, ...)`, in elements.
    Tensor {
        storage: Storage,
        offset: usize,
        shape: Vec<usize>,
        stride: Vec<usize>,
    },
}

/// A persistent id `('storage', torch.<Type>Storage, key, location, numel)`: the `numel`
/// elements of the storage type's dtype (`class`) in the archive's record `data/<key>`.
#[derive(Clone, Debug, PartialEq)]
pub struct Storage {
    pub class: String,
    pub key: String,
    pub numel: usize,
}

/// The stack holds values and the marks `MARK` pushes.
enum Slot {
    Mark,
    Value(Value),
}

/// Runs the pickle program `data` and returns the value it leaves.
pub fn unpickle(data: &[u8]) -> Result<Value> {
    let mut m = Machine { data, pos: 0, stack: Vec::new(), memo: HashMap::new() };
    m.run()
}

struct Machine<'a> {
    data: &'a [u8],
    pos: usize,
    stack: Vec<Slot>,
    memo: HashMap<u32, Value>,
}

impl Machine<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8]> {
        // pos never passes the end; a length read from the file may be anything.
        ensure!(n <= self.data.len() - self.pos, "the pickle ends inside an instruction at byte {}", self.pos);
        let out = &self.data[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }

    fn byte(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().expect("2 bytes")))
    }

    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }

    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8 bytes")))
    }

    /// A newline-terminated text argument (`GLOBAL`).
    fn line(&mut self) -> Result<String> {
        let end = self.data[self.pos..].iter().position(|&b| b == b'\n').context("the pickle ends inside a GLOBAL")?;
        let text = String::from_utf8(self.take(end)?.to_vec()).context("a GLOBAL name is not UTF-8")?;
        self.pos += 1;
        Ok(text)
    }

    fn string(&mut self, n: usize) -> Result<Value> {
        Ok(Value::Str(String::from_utf8(self.take(n)?.to_vec()).context("a pickled string is not UTF-8")?))
    }

    fn push(&mut self, v: Value) {
        self.stack.push(Slot::Value(v));
    }

    fn pop(&mut self) -> Result<Value> {
        match self.stack.pop() {
            Some(Slot::Value(v)) => Ok(v),
            Some(Slot::Mark) => bail!("a MARK where a value was expected"),
            None => bail!("the pickle pops an empty stack"),
        }
    }

    fn top(&mut self) -> Result<&mut Value> {
        match self.stack.last_mut() {
            Some(Slot::Value(v)) => Ok(v),
            _ => bail!("no value on the stack"),
        }
    }

    /// The values above the topmost mark, which goes too.
    fn pop_mark(&mut self) -> Result<Vec<Value>> {
        let at = self.stack.iter().rposition(|s| matches!(s, Slot::Mark)).context("no MARK on the stack")?;
        let items = self.stack.split_off(at + 1);
        self.stack.pop();
        Ok(items
            .into_iter()
            .map(|s| match s {
                Slot::Value(v) => v,
                Slot::Mark => unreachable!("the topmost mark is at `at`"),
            })
            .collect())
    }

    fn memoize(&mut self, key: u32) -> Result<()> {
        let v = self.top()?.clone();
        self.memo.insert(key, v);
        Ok(())
    }

    fn recall(&mut self, key: u32) -> Result<()> {
        let v = self.memo.get(&key).cloned().with_context(|| format!("memo entry {key} is read before it is written"))?;
        self.push(v);
        Ok(())
    }

    fn run(&mut self) -> Result<Value> {
        loop {
            let at = self.pos;
            let op = self.byte()?;
            match op {
                0x80 => {
                    let proto = self.byte()?;
                    ensure!(proto <= 5, "pickle protocol {proto} is newer than 5");
                }
                0x95 => drop(self.u64()?), // FRAME: a length hint
                b'.' => return self.pop(),
                b'(' => self.stack.push(Slot::Mark),
                b'0' => drop(self.pop()?),
                b'1' => drop(self.pop_mark()?),
                b'2' => {
                    let v = self.top()?.clone();
                    self.push(v);
                }
                b'N' => self.push(Value::None),
                0x88 => self.push(Value::Bool(true)),
                0x89 => self.push(Value::Bool(false)),
                b'J' => {
                    let v = self.u32()? as i32;
                    self.push(Value::Int(v as i64))
                }
                b'K' => {
                    let v = self.byte()?;
                    self.push(Value::Int(v as i64))
                }
                b'M' => {
                    let v = self.u16()?;
                    self.push(Value::Int(v as i64))
                }
                0x8a => {
                    // LONG1: a little-endian two's-complement integer of n bytes.
                    let n = self.byte()? as usize;
                    ensure!(n <= 8, "an integer of {n} bytes does not fit 64 bits");
                    let bytes = self.take(n)?;
                    let mut v: i64 = 0;
                    for (i, &b) in bytes.iter().enumerate() {
                        v |= (b as i64) << (8 * i);
                    }
                    if n > 0 && n < 8 && bytes[n - 1] & 0x80 != 0 {
                        v -= 1i64 << (8 * n);
                    }
                    self.push(Value::Int(v))
                }
                b'G' => {
                    let v = f64::from_be_bytes(self.take(8)?.try_into().expect("8 bytes"));
                    self.push(Value::Float(v))
                }
                b'X' => {
                    let n = self.u32()? as usize;
                    let v = self.string(n)?;
                    self.push(v)
                }
                0x8c => {
                    let n = self.byte()? as usize;
                    let v = self.string(n)?;
                    self.push(v)
                }
                0x8d => {
                    let n = self.u64()? as usize;
                    let v = self.string(n)?;
                    self.push(v)
                }
                b'B' => {
                    let n = self.u32()? as usize;
                    let v = self.take(n)?.to_vec();
                    self.push(Value::Bytes(v))
                }
                b'C' => {
                    let n = self.byte()? as usize;
                    let v = self.take(n)?.to_vec();
                    self.push(Value::Bytes(v))
                }
                b'}' => self.push(Value::Dict(Vec::new())),
                b']' => self.push(Value::List(Vec::new())),
                b')' => self.push(Value::Tuple(Vec::new())),
                b't' => {
                    let items = self.pop_mark()?;
                    self.push(Value::Tuple(items))
                }
                b'l' => {
                    let items = self.pop_mark()?;
                    self.push(Value::List(items))
                }
                b'd' => {
                    let items = self.pop_mark()?;
                    self.push(Value::Dict(pairs(items)?))
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    ensure!(self.stack.len() >= n, "TUPLE{n} on a stack of {}", self.stack.len());
                    let items = (0..n).map(|_| self.pop()).collect::<Result<Vec<_>>>()?;
                    self.push(Value::Tuple(items.into_iter().rev().collect()))
                }
                b'a' => {
                    let v = self.pop()?;
                    match self.top()? {
                        Value::List(items) => items.push(v),
                        other => bail!("APPEND to {}", kind(other)),
                    }
                }
                b'e' => {
                    let vs = self.pop_mark()?;
                    match self.top()? {
                        Value::List(items) => items.extend(vs),
                        other => bail!("APPENDS to {}", kind(other)),
                    }
                }
                b's' => {
                    let (k, v) = (self.pop()?, self.pop()?);
                    match self.top()? {
                        Value::Dict(items) => items.push((v, k)),
                        other => bail!("SETITEM on {}", kind(other)),
                    }
                }
                b'u' => {
                    let kv = pairs(self.pop_mark()?)?;
                    match self.top()? {
                        Value::Dict(items) => items.extend(kv),
                        other => bail!("SETITEMS on {}", kind(other)),
                    }
                }
                b'q' => {
                    let k = self.byte()? as u32;
                    self.memoize(k)?
                }
                b'r' => {
                    let k = self.u32()?;
                    self.memoize(k)?
                }
                0x94 => {
                    let k = self.memo.len() as u32;
                    self.memoize(k)?
                }
                b'h' => {
                    let k = self.byte()? as u32;
                    self.recall(k)?
                }
                b'j' => {
                    let k = self.u32()?;
                    self.recall(k)?
                }
                b'c' => {
                    let (module, name) = (self.line()?, self.line()?);
                    self.push(Value::Global(module, name))
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    match (module, name) {
                        (Value::Str(m), Value::Str(n)) => self.push(Value::Global(m, n)),
                        _ => bail!("STACK_GLOBAL without two strings"),
                    }
                }
                b'Q' => {
                    let pid = self.pop()?;
                    self.push(storage(pid)?)
                }
                b'R' => {
                    let args = self.pop()?;
                    let callable = self.pop()?;
                    self.push(call(callable, args)?)
                }
                b'b' => {
                    // BUILD: an OrderedDict's state is its `_metadata` (module versions); a
                    // tensor's, its Python attributes. Neither changes the weights.
                    let _state = self.pop()?;
                    match self.top()? {
                        Value::Dict(_) | Value::Tensor { .. } => {}
                        other => bail!("BUILD on {}", kind(other)),
                    }
                }
                other => bail!("pickle opcode 0x{other:02x} at byte {at} is not used by weight files"),
            }
        }
    }
}

fn pairs(items: Vec<Value>) -> Result<Vec<(Value, Value)>> {
    ensure!(items.len().is_multiple_of(2), "a dict from an odd number of items");
    let mut out = Vec::with_capacity(items.len() / 2);
    let mut it = items.into_iter();
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        out.push((k, v));
    }
    Ok(out)
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::None => "None",
        Value::Bool(_) => "a bool",
        Value::Int(_) => "an int",
        Value::Float(_) => "a float",
        Value::Str(_) => "a str",
        Value::Bytes(_) => "bytes",
        Value::Tuple(_) => "a tuple",
        Value::List(_) => "a list",
        Value::Dict(_) => "a dict",
        Value::Global(..) => "a global",
        Value::Storage(_) => "a storage",
        Value::Tensor { .. } => "a tensor",
    }
}

fn usize_of(v: &Value, what: &str) -> Result<usize> {
    match v {
        Value::Int(i) if *i >= 0 => Ok(*i as usize),
        other => bail!("{what}: expected a non-negative int, found {}", kind(other)),
    }
}

fn usizes(v: &Value, what: &str) -> Result<Vec<usize>> {
    match v {
        Value::Tuple(items) | Value::List(items) => items.iter().map(|x| usize_of(x, what)).collect(),
        other => bail!("{what}: expected a tuple of ints, found {}", kind(other)),
    }
}

/// A persistent id: `('storage', torch.<Type>Storage, key, location, numel)`.
fn storage(pid: Value) -> Result<Value> {
    let Value::Tuple(items) = pid else { bail!("a persistent id that is not a tuple") };
    match items.as_slice() {
        [Value::Str(tag), Value::Global(module, class), Value::Str(key), _location, numel] if tag == "storage" && module == "torch" => {
            Ok(Value::Storage(Storage { class: class.clone(), key: key.clone(), numel: usize_of(numel, "storage size")? }))
        }
        _ => bail!("a persistent id other than a torch storage"),
    }
}

/// `REDUCE`: the callables of a state dict, and nothing else.
fn call(callable: Value, args: Value) -> Result<Value> {
    let Value::Global(module, name) = callable else { bail!("REDUCE of {}", kind(&callable)) };
    let Value::Tuple(args) = args else { bail!("{module}.{name} called without an argument tuple") };
    match (module.as_str(), name.as_str(), args.as_slice()) {
        ("collections", "OrderedDict", []) => Ok(Value::Dict(Vec::new())),
        ("torch._utils", "_rebuild_tensor_v2", [storage, offset, size, stride, ..]) => {
            let Value::Storage(storage) = storage else { bail!("_rebuild_tensor_v2 of {}", kind(storage)) };
            Ok(Value::Tensor {
                storage: storage.clone(),
                offset: usize_of(offset, "tensor storage offset")?,
                shape: usizes(size, "tensor size")?,
                stride: usizes(stride, "tensor stride")?,
            })
        }
        // An nn.Parameter (with its Python attributes, `_with_state`): its tensor.
        ("torch._utils", "_rebuild_parameter" | "_rebuild_parameter_with_state", [tensor @ Value::Tensor { .. }, ..]) => Ok(tensor.clone()),
        _ => bail!(
            "the pickle calls {module}.{name}, which a file of weights does not need; it is not run (only tensors in \
             dicts are read, as torch.load(weights_only=True) reads them)"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pickles written by Python 3.11's `pickle.dumps(..., protocol=p)` for p = 2 and 4.
    #[test]
    fn reads_what_python_writes() {
        // pickle.dumps({"a": [1, -2, 300, 70000, -70000, 2**40], "b": (True, None, 1.5), "c": "é"}, protocol=2)
        let p2: &[u8] = b"\x80\x02}q\x00(X\x01\x00\x00\x00aq\x01]q\x02(K\x01J\xfe\xff\xff\xffM,\x01Jp\x11\x01\x00J\x90\xee\xfe\xff\x8a\x06\x00\x00\x00\x00\x00\x01eX\x01\x00\x00\x00bq\x03\x88NG?\xf8\x00\x00\x00\x00\x00\x00\x87q\x04X\x01\x00\x00\x00cq\x05X\x02\x00\x00\x00\xc3\xa9q\x06u.";
        // the same with protocol=4
        let p4: &[u8] = b"\x80\x04\x95C\x00\x00\x00\x00\x00\x00\x00}\x94(\x8c\x01a\x94]\x94(K\x01J\xfe\xff\xff\xffM,\x01Jp\x11\x01\x00J\x90\xee\xfe\xff\x8a\x06\x00\x00\x00\x00\x00\x01e\x8c\x01b\x94\x88NG?\xf8\x00\x00\x00\x00\x00\x00\x87\x94\x8c\x01c\x94\x8c\x02\xc3\xa9\x94u.";
        let s = |t: &str| Value::Str(t.to_string());
        let want = Value::Dict(vec![
            (s("a"), Value::List([1, -2, 300, 70000, -70000, 1 << 40].map(Value::Int).to_vec())),
            (s("b"), Value::Tuple(vec![Value::Bool(true), Value::None, Value::Float(1.5)])),
            (s("c"), s("é")),
        ]);
        assert_eq!(unpickle(p2).unwrap(), want);
        assert_eq!(unpickle(p4).unwrap(), want);
    }

    /// `torch.save({"w": nn.Parameter(torch.arange(6.).reshape(2, 3))})`'s data.pkl, plain and
    /// with an attribute set on the parameter (`_rebuild_parameter_with_state`): the tensor over
    /// storage "0".
    #[test]
    fn parameters_are_their_tensors() {
        let plain: &[u8] = b"\x80\x02}q\x00X\x01\x00\x00\x00wq\x01ctorch._utils\x0a_rebuild_parameter\x0aq\x02ctorch._utils\x0a_rebuild_tensor_v2\x0aq\x03((X\x07\x00\x00\x00storageq\x04ctorch\x0aFloatStorage\x0aq\x05X\x01\x00\x00\x000q\x06X\x03\x00\x00\x00cpuq\x07K\x06tq\x08QK\x00K\x02K\x03\x86q\x09K\x03K\x01\x86q\x0a\x89ccollections\x0aOrderedDict\x0aq\x0b)Rq\x0ctq\x0dRq\x0e\x88h\x0b)Rq\x0f\x87q\x10Rq\x11s.";
        let with_state: &[u8] = b"\x80\x02}q\x00X\x01\x00\x00\x00wq\x01ctorch._utils\x0a_rebuild_parameter_with_state\x0aq\x02(ctorch._utils\x0a_rebuild_tensor_v2\x0aq\x03((X\x07\x00\x00\x00storageq\x04ctorch\x0aFloatStorage\x0aq\x05X\x01\x00\x00\x000q\x06X\x03\x00\x00\x00cpuq\x07K\x06tq\x08QK\x00K\x02K\x03\x86q\x09K\x03K\x01\x86q\x0a\x89ccollections\x0aOrderedDict\x0aq\x0b)Rq\x0ctq\x0dRq\x0e\x88h\x0b)Rq\x0f}q\x10X\x05\x00\x00\x00extraq\x11K\x01stq\x12Rq\x13s.";
        let storage = Storage { class: "FloatStorage".into(), key: "0".into(), numel: 6 };
        let want = Value::Dict(vec![(Value::Str("w".into()), Value::Tensor { storage, offset: 0, shape: vec![2, 3], stride: vec![3, 1] })]);
        assert_eq!(unpickle(plain).unwrap(), want);
        assert_eq!(unpickle(with_state).unwrap(), want);
    }

    /// A pickle that calls anything outside the state-dict allowlist is refused by name.
    #[test]
    fn refuses_to_call_other_globals() {
        // pickle.dumps of an object whose __reduce__ is (os.system, ("echo hi",)), protocol 2
        let evil: &[u8] = b"\x80\x02cposix\nsystem\nq\x00X\x07\x00\x00\x00echo hiq\x01\x85q\x02Rq\x03.";
        let e = unpickle(evil).unwrap_err().to_string();
        assert!(e.contains("posix.system") && e.contains("not run"), "{e}");
    }

    #[test]
    fn truncated_input_is_an_error_not_a_panic() {
        let p2: &[u8] = b"\x80\x02}q\x00X\x01\x00\x00\x00aq\x01K\x01s."; // {"a": 1}
        assert!(unpickle(p2).is_ok());
        for n in 0..p2.len() - 1 {
            assert!(unpickle(&p2[..n]).is_err(), "{n} bytes");
        }
        // A string claiming 2^64 - 1 bytes (BINUNICODE8).
        assert!(unpickle(b"\x80\x04\x8d\xff\xff\xff\xff\xff\xff\xff\xff.").is_err());
    }
}
