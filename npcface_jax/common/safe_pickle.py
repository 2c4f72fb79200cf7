"""A pickle reader that runs nothing the file names.

Why not ``pickle.Unpickler`` with an allowlist of globals: whatever it lets
through is then *called* with arguments from the file, and the callees
(NumPy's dtype and array reconstruction, torch's tensor rebuild) trust
those arguments; a forged NumPy dtype state crashes the process from a
200-byte file. So ``Reader`` runs the pickle opcodes itself, over plain
values (None, bools, ints, floats, str, bytes, tuples, lists, dicts) and
placeholders, and hands every constructor call, BUILD, NEWOBJ and
persistent id to a ``Vocabulary``: the file format's own rules, which
recognise the few patterns its files hold, field by field, and refuse the
rest. A global is only ever a name (``Global``); nothing is imported.

Memory stays bounded by the input: every length field is checked against
the bytes that remain before anything is read, integers are bounded, the
opcodes a format never uses are refused, and dict keys are flat scalars
(hashing a key nested 10^5 deep would recurse in C). Errors are ``Refused``
with the byte offset of the opcode and its name; each format wraps them in
its own error naming the file.
"""

from __future__ import annotations

import codecs
import pickle
import reprlib
import struct
from collections.abc import Mapping
from typing import Any

_MAX_LINE = 256  # text-protocol lines other than string values (ints, names)


class Refused(Exception):
  """The pickle holds something its format's vocabulary does not."""


class Global:
  """A global the file named, by the vocabulary's canonical name for it."""

  def __init__(self, name: str):
    self.name = name

  def __repr__(self) -> str:
    return self.name


class Vocabulary:
  """What one file format's pickles may hold. Subclasses set ``what`` (the
  format, for messages), ``opcodes`` (a subset of ``OPCODES``' keys) and
  ``globals`` ((module, name) -> canonical name), and override the hooks
  they allow; each hook's default refuses."""

  what = 'this kind of file'
  opcodes: frozenset[bytes] = frozenset()
  globals: Mapping[tuple[str, str], str] = {}
  max_int_bytes = 8

  def load_global(self, module: str, name: str) -> Any:
    canonical = self.globals.get((module, name))
    if canonical is None:
      raise Refused(self.refused_global(module[:60], name[:60]))
    return Global(canonical)

  def refused_global(self, module: str, name: str) -> str:
    return (f'refused to load the global {module}.{name}: {self.what} never '
            'names it, and loading it could run code')

  def call(self, func, args: tuple) -> Any:
    """REDUCE: func(*args), where func came off the stack."""
    raise Refused(f'refused the call {describe(func)}{describe(args)}, which '
                  f'{self.what} never makes')

  def build(self, obj, state) -> None:
    """BUILD: obj.__setstate__(state), in place."""
    raise Refused(f'refused the state {describe(state)} for a '
                  f'{type(obj).__name__.strip("_")}')

  def new_object(self, cls, args: tuple) -> Any:
    """NEWOBJ: cls.__new__(cls, *args)."""
    raise Refused(f'refused to create a {describe(cls)} object')

  def persistent(self, pid) -> Any:
    """BINPERSID: the object the pickler stored outside the pickle."""
    raise Refused(f'a persistent id {describe(pid)}, which {self.what} '
                  'never holds')


class Reader:
  """Runs the pickle that starts at ``start`` in ``data`` through the
  vocabulary: ``load()`` returns its value; ``pos`` is then the byte after
  its STOP (formats with several pickles in a row read on from there)."""

  def __init__(self, data, vocabulary: Vocabulary, start: int = 0):
    self.data, self.pos, self.vocab = data, start, vocabulary
    self.stack: list = []
    self.marks: list[list] = []
    self.memo: dict[int, Any] = {}

  # --- reading the byte stream ---
  def take(self, n: int) -> bytes:
    if n < 0 or n > len(self.data) - self.pos:
      raise Refused(f'a length of {n} bytes runs past the end of the file '
                    f'({len(self.data) - self.pos} bytes remain): truncated '
                    'or corrupt')
    out = bytes(self.data[self.pos:self.pos + n])
    self.pos += n
    return out

  def uint(self, n: int) -> int:
    return int.from_bytes(self.take(n), 'little')

  def line(self, limit: int | None = _MAX_LINE) -> bytes:
    end = self.data.find(b'\n', self.pos,
                         len(self.data) if limit is None
                         else self.pos + limit + 1)
    if end < 0:
      raise Refused('a text-protocol line without its end (truncated, or '
                    'longer than such a line can be)')
    return self.take(end + 1 - self.pos)[:-1]

  def signed(self, n: int) -> int:
    if n > self.vocab.max_int_bytes:
      raise Refused(f'a {n}-byte integer; {self.vocab.what} holds none that '
                    'large')
    return int.from_bytes(self.take(n), 'little', signed=True)

  def small_int(self, text: bytes) -> int:
    """INT / LONG / PUT / GET text arguments: at most 20 digits."""
    text = text.rstrip(b'L')
    if not (0 < len(text) <= 20 and text.lstrip(b'-').isdigit()
            and text.isascii()):
      raise Refused(f'{text[:40]!r} where a (small) integer belongs')
    return int(text)

  # --- the stack ---
  def pop(self):
    if not self.stack:
      raise Refused('an opcode that needs a value on an empty stack')
    return self.stack.pop()

  def top(self, what: str):
    if not self.stack:
      raise Refused(f'{what} on an empty stack')
    return self.stack[-1]

  def pop_mark(self) -> list:
    if not self.marks:
      raise Refused('an opcode that needs a MARK without one')
    items, self.stack = self.stack, self.marks.pop()
    return items

  def memo_get(self, key: int):
    if key not in self.memo:
      raise Refused(f'a memo reference {key} that was never stored')
    self.stack.append(self.memo[key])

  def memo_put(self, key: int) -> None:
    self.memo[key] = self.top('a memo store')

  def append(self, items: list) -> None:
    target = self.stack[-1] if self.stack else None
    if type(target) is not list:
      raise Refused(f'APPEND to a {type(target).__name__}')
    target.extend(items)

  def set_items(self, items: list) -> None:
    target = self.stack[-1] if self.stack else None
    if not isinstance(target, dict):
      raise Refused(f'SETITEM on a {type(target).__name__}')
    if len(items) % 2:
      raise Refused('SETITEMS with a key but no value')
    for key, value in zip(items[::2], items[1::2]):
      target[flat_key(key)] = value

  # --- the loop ---
  def load(self):
    allowed = self.vocab.opcodes
    while True:
      at = self.pos
      if at >= len(self.data):
        raise Refused(f'the file ends at byte {at} before the pickle does '
                      '(truncated)')
      op = self.take(1)
      handler = OPCODES.get(op) if op in allowed else None
      if handler is None:
        raise Refused(f'opcode {op!r} ({opcode_name(op)}) at byte {at}, which '
                      f'{self.vocab.what} never uses')
      try:
        if handler(self) is _STOP:
          break
      except Refused as e:
        raise Refused(f'at byte {at} ({opcode_name(op)}): {e}') from None
      except Exception as e:  # noqa: BLE001 (plain values only: malformed)
        raise Refused(f'at byte {at} ({opcode_name(op)}): {type(e).__name__}: '
                      f'{e}') from None
    value = self.pop()
    if self.stack or self.marks:
      raise Refused('values left on the stack after STOP')
    return value


_STOP = object()
_KEY_TYPES = (str, int, float, bool, bytes, type(None))


def flat_key(key):
  """A dict key: a flat scalar, so hashing it cannot recurse."""
  if type(key) not in _KEY_TYPES:
    raise Refused(f'a dict key of type {type(key).__name__}; keys are '
                  'strings or numbers')
  return key


def describe(value) -> str:
  """A short repr for messages; bounded in depth and length, so a hostile
  nesting of lists cannot recurse deeply or print megabytes."""
  if isinstance(value, (bytes, bytearray, str)):
    return f'<{len(value)} {"chars" if isinstance(value, str) else "bytes"}>'
  return _REPR.repr(value)


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxother, _REPR.maxstring = 3, 40, 40


def opcode_name(op: bytes) -> str:
  """The opcode's name, for messages."""
  import pickletools  # noqa: PLC0415 (only to name an opcode)
  return next((o.name for o in pickletools.opcodes
               if o.code.encode('latin-1') == op), 'no pickle opcode')


def same(got, want) -> bool:
  """got == want with equal types throughout (True is not 1 here)."""
  if type(got) is not type(want):
    return False
  if isinstance(want, tuple):
    return len(got) == len(want) and all(map(same, got, want))
  return got == want


# --- the opcode handlers ---

def _text_string(r: Reader) -> bytes:
  """STRING: Python 2's repr of a str, quoted."""
  text = r.line(None)
  if len(text) < 2 or text[0] != text[-1] or text[:1] not in (b'"', b"'"):
    raise Refused('a STRING that is not quoted')
  try:
    return codecs.escape_decode(text[1:-1])[0]
  except ValueError as e:
    raise Refused(f'a STRING with a bad escape: {e}') from None


def _unicode(raw: bytes, how: str = 'utf-8') -> str:
  try:
    return str(raw, how, 'surrogatepass' if how == 'utf-8' else 'strict')
  except UnicodeDecodeError as e:
    raise Refused(f'a text value that does not decode: {e}') from None


def _int_line(r: Reader):
  text = r.line()
  if text in (b'00', b'01'):  # protocols 0-1 write bools as INT 00 / 01
    return text == b'01'
  return r.small_int(text)


def _float_line(r: Reader) -> float:
  text = r.line()
  if not (0 < len(text) <= 40 and text.isascii()):
    raise Refused(f'{text[:40]!r} where a float belongs')
  return float(text)


def _stack_global(r: Reader):
  name, module = r.pop(), r.pop()
  if type(module) is not str or type(name) is not str:
    raise Refused('STACK_GLOBAL of non-text names')
  return r.vocab.load_global(module, name)


def _push(make):
  def handler(r):
    value = make(r)  # first: make may pop a MARK, replacing r.stack
    r.stack.append(value)
  return handler


def _tuple(n):
  def handler(r):
    items = [r.pop() for _ in range(n)][::-1]
    r.stack.append(tuple(items))
  return handler


def _checked_args(args) -> tuple:
  if type(args) is not tuple:
    raise Refused(f'call arguments of type {type(args).__name__}')
  return args


def _reduce(r):
  args = _checked_args(r.pop())
  r.stack.append(r.vocab.call(r.pop(), args))


def _new_object(r):
  args = _checked_args(r.pop())
  r.stack.append(r.vocab.new_object(r.pop(), args))


def _new_object_ex(r):
  kwargs, args = r.pop(), _checked_args(r.pop())
  if kwargs != {}:
    raise Refused(f'NEWOBJ_EX with keyword arguments {describe(kwargs)}')
  r.stack.append(r.vocab.new_object(r.pop(), args))


def _build(r):
  state = r.pop()
  r.vocab.build(r.top('BUILD'), state)


def _set_item(r):
  value = r.pop()
  key = r.pop()
  r.set_items([key, value])


def _dict(r):
  items = r.pop_mark()
  r.stack.append({})
  r.set_items(items)


def _mark(r):
  r.marks.append(r.stack)
  r.stack = []


def _proto(r):
  version = r.uint(1)
  if version > pickle.HIGHEST_PROTOCOL:
    raise Refused(f'pickle protocol {version}')


def _frame(r):
  """FRAME only announces how many bytes follow: check, then read on."""
  size = r.uint(8)
  if size > len(r.data) - r.pos:
    raise Refused(f'a frame of {size} bytes runs past the end of the file')


def _global(r):
  module = _unicode(r.line(), 'ascii')
  return r.vocab.load_global(module, _unicode(r.line(), 'ascii'))


OPCODES = {
    b'\x80': _proto, b'\x95': _frame, b'.': lambda r: _STOP,
    b'(': _mark, b'0': lambda r: r.pop(), b'1': lambda r: r.pop_mark(),
    b'2': _push(lambda r: r.top('DUP')),
    b'N': _push(lambda r: None), b'\x88': _push(lambda r: True),
    b'\x89': _push(lambda r: False),
    b'I': _push(_int_line), b'L': _push(lambda r: r.small_int(r.line())),
    b'J': _push(lambda r: r.signed(4)), b'K': _push(lambda r: r.uint(1)),
    b'M': _push(lambda r: r.uint(2)),
    b'\x8a': _push(lambda r: r.signed(r.uint(1))),
    b'\x8b': _push(lambda r: r.signed(r.uint(4))),
    b'G': _push(lambda r: struct.unpack('>d', r.take(8))[0]),
    b'F': _push(_float_line),
    # Python 2 str (read as bytes), bytes, bytearray.
    b'S': _push(_text_string),
    b'T': _push(lambda r: r.take(r.signed(4))),
    b'U': _push(lambda r: r.take(r.uint(1))),
    b'B': _push(lambda r: r.take(r.uint(4))),
    b'C': _push(lambda r: r.take(r.uint(1))),
    b'\x8e': _push(lambda r: r.take(r.uint(8))),
    b'\x96': _push(lambda r: r.take(r.uint(8))),
    b'V': _push(lambda r: _unicode(r.line(None), 'raw-unicode-escape')),
    b'X': _push(lambda r: _unicode(r.take(r.uint(4)))),
    b'\x8c': _push(lambda r: _unicode(r.take(r.uint(1)))),
    b'\x8d': _push(lambda r: _unicode(r.take(r.uint(8)))),
    b')': _push(lambda r: ()), b't': _push(lambda r: tuple(r.pop_mark())),
    b'\x85': _tuple(1), b'\x86': _tuple(2), b'\x87': _tuple(3),
    b']': _push(lambda r: []), b'l': _push(lambda r: list(r.pop_mark())),
    b'a': lambda r: r.append([r.pop()]), b'e': lambda r: r.append(r.pop_mark()),
    b'}': _push(lambda r: {}), b'd': _dict, b's': _set_item,
    b'u': lambda r: r.set_items(r.pop_mark()),
    b'c': _push(_global), b'\x93': _push(_stack_global),
    b'R': _reduce, b'b': _build, b'\x81': _new_object,
    b'\x92': _new_object_ex,
    b'Q': _push(lambda r: r.vocab.persistent(r.pop())),
    b'p': lambda r: r.memo_put(r.small_int(r.line())),
    b'q': lambda r: r.memo_put(r.uint(1)),
    b'r': lambda r: r.memo_put(r.uint(4)),
    b'\x94': lambda r: r.memo_put(len(r.memo)),
    b'g': lambda r: r.memo_get(r.small_int(r.line())),
    b'h': lambda r: r.memo_get(r.uint(1)),
    b'j': lambda r: r.memo_get(r.uint(4)),
}

# Plain values, tuples and lists, globals and calls: what a list-of-bytes
# pickle needs. The others add what their files hold.
BASIC = frozenset(OPCODES) - frozenset(b'G F } d s u \x81 \x92 Q'.split())
DICTS = frozenset((b'}', b'd', b's', b'u'))
FLOATS = frozenset((b'G', b'F'))
OBJECTS = frozenset((b'\x81', b'\x92'))
PERSISTENT = frozenset((b'Q',))
