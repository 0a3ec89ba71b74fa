//! A restricted unpickler for PyTorch files (`torch.save` of a state dict, or of a training
//! checkpoint holding one).
//!
//! It builds data and nothing else; no Python callable is ever run. [`Calls::StateDict`] knows
//! only the few callables a state dict is made of (an `OrderedDict`,
//! `torch._utils._rebuild_tensor_v2`, `_rebuild_parameter`) and refuses any other, as
//! `torch.load(weights_only=True)` does. [`Calls::Record`] reads training checkpoints (fairseq's),
//! whose configs and meters are Python objects: every other class or function call becomes an
//! inert [`Value::Object`] recording the class, its arguments and its state.
//! Storages come back as PyTorch's persistent ids name them; `crate::model::torch_bin` finds
//! their bytes in the file.

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
    /// An integer wider than 64 bits, as its little-endian two's-complement bytes.
    BigInt(Vec<u8>),
    /// A module attribute named by `GLOBAL` (only ever used as a storage's type, or called).
    Global(String, String),
    /// [`Calls::Record`]: what calling `class` (`module.name`) with `args` and then setting
    /// `state` (`BUILD`) would have made; nothing was called.
    Object {
        class: String,
        args: Vec<Value>,
        state: Option<Box<Value>>,
    },
    Storage(Storage),
    /// `_rebuild_tensor_v2(storage, offset, size, stride, ...)`, in elements.
    Tensor {
        storage: Storage,
        offset: usize,
        shape: Vec<usize>,
        stride: Vec<usize>,
    },
}

/// A persistent id `('storage', torch.<Type>Storage, key, location, numel[, view])`: the `numel`
/// elements of the storage type's dtype (`class`) that the file keeps under `key`.
#[derive(Clone, Debug, PartialEq)]
pub struct Storage {
    pub class: String,
    pub key: String,
    pub numel: usize,
}

impl Value {
    /// A dict's entry under the string key `name`, or an object's attribute (an entry of its
    /// state: an `argparse.Namespace`'s, say).
    pub fn field(&self, name: &str) -> Option<&Value> {
        match self {
            Value::Dict(items) => items.iter().find(|(k, _)| matches!(k, Value::Str(s) if s == name)).map(|(_, v)| v),
            Value::Object { state: Some(state), .. } => state.field(name),
            _ => None,
        }
    }

    /// Calls `f` on every storage inside the value.
    pub fn for_each_storage(&self, f: &mut impl FnMut(&Storage)) {
        match self {
            Value::Storage(s) | Value::Tensor { storage: s, .. } => f(s),
            Value::Tuple(items) | Value::List(items) => items.iter().for_each(|v| v.for_each_storage(f)),
            Value::Dict(items) => items.iter().for_each(|(k, v)| {
                k.for_each_storage(f);
                v.for_each_storage(f)
            }),
            Value::Object { args, state, .. } => {
                args.iter().for_each(|v| v.for_each_storage(f));
                state.iter().for_each(|v| v.for_each_storage(f))
            }
            _ => {}
        }
    }
}

/// The stack holds values and the marks `MARK` pushes.
enum Slot {
    Mark,
    Value(Value),
}

/// Which Python calls a pickle may make.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Calls {
    /// Those of a state dict only; any other is refused.
    StateDict,
    /// Those of a state dict, `set`s as lists, and any other recorded as a [`Value::Object`].
    Record,
}

/// Runs the pickle program `data` (a state dict's: [`Calls::StateDict`]) and returns the value
/// it leaves.
pub fn unpickle(data: &[u8]) -> Result<Value> {
    Ok(unpickle_prefix(data, Calls::StateDict)?.0)
}

/// Runs the pickle program at the start of `data` and returns the value it leaves and the
/// number of bytes it took (files of several pickles in a row read the next from there).
pub fn unpickle_prefix(data: &[u8], calls: Calls) -> Result<(Value, usize)> {
    let mut m = Machine { data, pos: 0, stack: Vec::new(), memo: HashMap::new(), pending: HashMap::new(), calls };
    let value = m.run()?;
    Ok((value, m.pos))
}

struct Machine<'a> {
    data: &'a [u8],
    pos: usize,
    stack: Vec<Slot>,
    memo: HashMap<u32, Value>,
    /// Memo keys of containers still on the stack (key -> stack slot): Python memoizes a
    /// container when it is made, empty, and fills it after, so the memo takes its value when
    /// it leaves the stack, finished (a reference before that reads the slot).
    pending: HashMap<u32, usize>,
    calls: Calls,
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
        let slot = self.stack.len().wrapping_sub(1);
        match self.stack.pop() {
            Some(Slot::Value(v)) => {
                self.settle(slot, &v);
                Ok(v)
            }
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
        let values: Vec<Value> = items
            .into_iter()
            .map(|s| match s {
                Slot::Value(v) => v,
                Slot::Mark => unreachable!("the topmost mark is at `at`"),
            })
            .collect();
        for (i, v) in values.iter().enumerate() {
            self.settle(at + 1 + i, v);
        }
        Ok(values)
    }

    /// The container in stack slot `slot`, `value`, is finished: memo entries made of it take it.
    fn settle(&mut self, slot: usize, value: &Value) {
        if self.pending.values().any(|&s| s == slot) {
            let keys: Vec<u32> = self.pending.iter().filter(|(_, &s)| s == slot).map(|(&k, _)| k).collect();
            for key in keys {
                self.pending.remove(&key);
                self.memo.insert(key, value.clone());
            }
        }
    }

    fn memoize(&mut self, key: u32) -> Result<()> {
        let slot = self.stack.len().wrapping_sub(1);
        let v = self.top()?;
        if matches!(v, Value::Dict(_) | Value::List(_) | Value::Object { .. }) {
            self.memo.remove(&key);
            self.pending.insert(key, slot);
        } else {
            let v = v.clone();
            self.pending.remove(&key);
            self.memo.insert(key, v);
        }
        Ok(())
    }

    fn recall(&mut self, key: u32) -> Result<()> {
        let v = match (self.memo.get(&key), self.pending.get(&key).map(|&slot| &self.stack[slot])) {
            (Some(v), _) | (None, Some(Slot::Value(v))) => v.clone(),
            _ => bail!("memo entry {key} is read before it is written"),
        };
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
                    let n = self.byte()? as usize;
                    let v = long(self.take(n)?);
                    self.push(v)
                }
                0x8b => {
                    let n = self.u32()? as usize;
                    let v = long(self.take(n)?);
                    self.push(v)
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
                    // MEMOIZE: the next key, counting containers not yet finished.
                    let k = (self.memo.len() + self.pending.len()) as u32;
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
                    let v = self.call(callable, args)?;
                    self.push(v)
                }
                0x81 => {
                    // NEWOBJ: `cls.__new__(cls, *args)`, how protocol 2 makes class instances.
                    let args = self.pop()?;
                    let class = self.pop()?;
                    let v = self.call(class, args)?;
                    self.push(v)
                }
                0x92 => {
                    // NEWOBJ_EX: the same with keyword arguments, which no known call takes.
                    let _kwargs = self.pop()?;
                    let args = self.pop()?;
                    let class = self.pop()?;
                    let v = self.call(class, args)?;
                    self.push(v)
                }
                b'b' => {
                    // BUILD: an OrderedDict's state is its `_metadata` (module versions); a
                    // tensor's, its Python attributes. Neither changes the weights. A recorded
                    // object keeps its state (an argparse.Namespace's attributes, say).
                    let new_state = self.pop()?;
                    let calls = self.calls;
                    match self.top()? {
                        Value::Object { state, .. } => *state = Some(Box::new(new_state)),
                        Value::Dict(_) | Value::Tensor { .. } => {}
                        _ if calls == Calls::Record => {}
                        other => bail!("BUILD on {}", kind(other)),
                    }
                }
                other => bail!("pickle opcode 0x{other:02x} at byte {at} is not used by weight files"),
            }
        }
    }
}

/// `LONG1` / `LONG4`: a little-endian two's-complement integer of `bytes.len()` bytes.
fn long(bytes: &[u8]) -> Value {
    let n = bytes.len();
    if n > 8 {
        return Value::BigInt(bytes.to_vec());
    }
    let mut v: i64 = 0;
    for (i, &b) in bytes.iter().enumerate() {
        v |= (b as i64) << (8 * i);
    }
    if n > 0 && n < 8 && bytes[n - 1] & 0x80 != 0 {
        v -= 1i64 << (8 * n);
    }
    Value::Int(v)
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
        Value::BigInt(_) => "a big int",
        Value::Str(_) => "a str",
        Value::Bytes(_) => "bytes",
        Value::Tuple(_) => "a tuple",
        Value::List(_) => "a list",
        Value::Dict(_) => "a dict",
        Value::Global(..) => "a global",
        Value::Object { .. } => "an object",
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

/// A persistent id: `('storage', torch.<Type>Storage, key, location, numel)`, and in PyTorch's
/// format before 1.6 a sixth item, a view of another storage (never written since 1.0).
fn storage(pid: Value) -> Result<Value> {
    let Value::Tuple(items) = pid else { bail!("a persistent id that is not a tuple") };
    match items.as_slice() {
        [Value::Str(tag), Value::Global(module, class), Value::Str(key), _location, numel]
        | [Value::Str(tag), Value::Global(module, class), Value::Str(key), _location, numel, Value::None]
            if tag == "storage" && module == "torch" =>
        {
            Ok(Value::Storage(Storage { class: class.clone(), key: key.clone(), numel: usize_of(numel, "storage size")? }))
        }
        _ => bail!("a persistent id other than a torch storage"),
    }
}

impl Machine<'_> {
    /// `REDUCE` and `NEWOBJ`: a state dict's callables; under [`Calls::Record`] the others are
    /// recorded, never run.
    fn call(&self, callable: Value, args: Value) -> Result<Value> {
        let Value::Global(module, name) = &callable else { bail!("a call of {}", kind(&callable)) };
        let Value::Tuple(args) = args else { bail!("{module}.{name} called without an argument tuple") };
        match (call_state_dict(module, name, &args)?, self.calls) {
            (Some(v), _) => Ok(v),
            (None, Calls::Record) => Ok(record(module, name, args)),
            (None, Calls::StateDict) => bail!(
                "the pickle calls {module}.{name}, which a file of weights does not need; it is not run (only tensors in \
                 dicts are read, as torch.load(weights_only=True) reads them)"
            ),
        }
    }
}

/// What [`Calls::Record`] makes of a call outside a state dict's: a set's items as a list, an
/// instance rebuilt by protocols 0 and 1 (`copyreg._reconstructor(cls, ...)`) as one of `cls`,
/// anything else as itself.
fn record(module: &str, name: &str, args: Vec<Value>) -> Value {
    match (module, name, args.as_slice()) {
        ("builtins" | "__builtin__", "set" | "frozenset", [Value::List(items)]) => Value::List(items.clone()),
        ("copyreg" | "copy_reg", "_reconstructor", [Value::Global(m, n), ..]) => {
            Value::Object { class: format!("{m}.{n}"), args: Vec::new(), state: None }
        }
        _ => Value::Object { class: format!("{module}.{name}"), args, state: None },
    }
}

/// The callables of a state dict, and nothing else: `None` for any other.
fn call_state_dict(module: &str, name: &str, args: &[Value]) -> Result<Option<Value>> {
    Ok(Some(match (module, name, args) {
        ("collections", "OrderedDict", []) => Value::Dict(Vec::new()),
        ("torch._utils", "_rebuild_tensor_v2", [storage, offset, size, stride, ..]) => {
            let Value::Storage(storage) = storage else { bail!("_rebuild_tensor_v2 of {}", kind(storage)) };
            Value::Tensor {
                storage: storage.clone(),
                offset: usize_of(offset, "tensor storage offset")?,
                shape: usizes(size, "tensor size")?,
                stride: usizes(stride, "tensor stride")?,
            }
        }
        // An nn.Parameter (with its Python attributes, `_with_state`): its tensor.
        ("torch._utils", "_rebuild_parameter" | "_rebuild_parameter_with_state", [tensor @ Value::Tensor { .. }, ..]) => tensor.clone(),
        _ => return Ok(None),
    }))
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

    /// A training checkpoint's objects: `pickle.dumps({"args": argparse.Namespace(lr=0.5,
    /// arch="wav2vec2"), "seen": {3}}, protocol=2)`. Recorded, their attributes readable, under
    /// `Calls::Record`; refused under `Calls::StateDict`.
    #[test]
    fn records_objects_without_calling_them() {
        let p: &[u8] = b"\x80\x02}q\x00(X\x04\x00\x00\x00argsq\x01cargparse\nNamespace\nq\x02)\x81q\x03}q\x04(X\x02\x00\x00\x00lrq\x05G?\xe0\x00\x00\x00\x00\x00\x00X\x04\x00\x00\x00archq\x06X\x08\x00\x00\x00wav2vec2q\x07ubX\x04\x00\x00\x00seenq\x08c__builtin__\nset\nq\t]q\nK\x03a\x85q\x0bRq\x0cu.";
        let (v, len) = unpickle_prefix(p, Calls::Record).unwrap();
        assert_eq!(len, p.len());
        let args = v.field("args").unwrap();
        assert!(matches!(args, Value::Object { class, .. } if class == "argparse.Namespace"));
        assert_eq!(args.field("lr"), Some(&Value::Float(0.5)));
        assert_eq!(args.field("arch"), Some(&Value::Str("wav2vec2".into())));
        assert_eq!(v.field("seen"), Some(&Value::List(vec![Value::Int(3)])));
        let e = unpickle(p).unwrap_err().to_string();
        assert!(e.contains("argparse.Namespace") && e.contains("not run"), "{e}");
        // 2**70: wider than 64 bits, kept as its bytes.
        let big = unpickle(b"\x80\x02\x8a\x09\x00\x00\x00\x00\x00\x00\x00\x00\x40.").unwrap();
        assert_eq!(big, Value::BigInt(vec![0, 0, 0, 0, 0, 0, 0, 0, 0x40]));
    }

    /// A container referenced twice is the same value both times, though Python memoizes it
    /// empty before filling it: `x = {"k": 1}; pickle.dumps({"a": x, "b": x, "l": [x, [2]]},
    /// protocol=2)`, and `{"a": x, "b": x}` with protocol 4.
    #[test]
    fn shared_containers_read_back_whole() {
        let p2: &[u8] = b"\x80\x02}q\x00(X\x01\x00\x00\x00aq\x01}q\x02X\x01\x00\x00\x00kq\x03K\x01sX\x01\x00\x00\x00bq\x04h\x02X\x01\x00\x00\x00lq\x05]q\x06(h\x02]q\x07K\x02aeu.";
        let p4: &[u8] = b"\x80\x04\x95\x18\x00\x00\x00\x00\x00\x00\x00}\x94(\x8c\x01a\x94}\x94\x8c\x01k\x94K\x01s\x8c\x01b\x94h\x02u.";
        let x = Value::Dict(vec![(Value::Str("k".into()), Value::Int(1))]);
        let v = unpickle(p2).unwrap();
        assert_eq!((v.field("a"), v.field("b")), (Some(&x), Some(&x)));
        assert_eq!(v.field("l"), Some(&Value::List(vec![x.clone(), Value::List(vec![Value::Int(2)])])));
        let v = unpickle(p4).unwrap();
        assert_eq!((v.field("a"), v.field("b")), (Some(&x), Some(&x)));
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
