"""TensorBoard scalars, written synchronously by hand: no writer thread, no at-exit flush.

An events file is a sequence of TFRecords (length, its masked CRC-32C, the bytes, their masked
CRC-32C), each an `Event` protobuf: the first carries `file_version`, the others a `Summary`
of `simple_value` scalars. The few protobuf fields are encoded here directly, so writing
scalars needs neither TensorFlow, nor tensorboardX (which imports torch when installed and
flushes from a background thread, whose errors surface as tracebacks at exit), and a failed
write is an OSError naming the file at the call that caused it.
"""

import os
import socket
import struct
import time

_CRC_TABLE = []
for _n in range(256):
  for _ in range(8):
    _n = (_n >> 1) ^ 0x82F63B78 if _n & 1 else _n >> 1
  _CRC_TABLE.append(_n)


def crc32c(data):
  """CRC-32C (Castagnoli) of `data`, as TFRecord framing uses it."""
  crc = 0xFFFFFFFF
  for b in data:
    crc = _CRC_TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def _masked_crc(data):
  crc = crc32c(data)
  return struct.pack('<I', (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF)


def _varint(n):
  out = bytearray()
  while True:
    byte, n = n & 0x7F, n >> 7
    out.append(byte | (0x80 if n else 0))
    if not n:
      return bytes(out)


def _field(number, wire_type, payload):
  """One protobuf field: its key, then (for length-delimited fields) the length."""
  key = _varint(number << 3 | wire_type)
  return key + (_varint(len(payload)) + payload if wire_type == 2 else payload)


def event(wall_time, step, *, scalars=None, file_version=None):
  """The bytes of an `Event` (tensorboard/compat/proto/event.proto)."""
  out = _field(1, 1, struct.pack('<d', wall_time)) + _field(2, 0, _varint(step))
  if file_version is not None:
    out += _field(3, 2, file_version.encode())
  if scalars:
    summary = b''.join(_field(1, 2, _field(1, 2, tag.encode()) +
                              _field(2, 5, struct.pack('<f', value)))
                       for tag, value in scalars.items())
    out += _field(5, 2, summary)
  return out


def record(data):
  """`data` framed as one TFRecord."""
  header = struct.pack('<Q', len(data))
  return header + _masked_crc(header) + data + _masked_crc(data)


class EventWriter:
  """Appends scalar events to a new `events.out.tfevents.*` file in `logdir`."""

  def __init__(self, logdir):
    os.makedirs(logdir, exist_ok=True)
    name = f'events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}.zoo'
    self.path = os.path.join(logdir, name)
    self._file = open(self.path, 'ab')
    self._append(event(time.time(), 0, file_version='brain.Event:2'))

  def scalars(self, step, values):
    """Writes `{tag: float}` at `step` (one event, flushed)."""
    self._append(event(time.time(), int(step), scalars=values))

  def close(self):
    self._file.close()

  def _append(self, data):
    try:
      self._file.write(record(data))
      self._file.flush()
    except OSError as e:
      raise OSError(e.errno, f'could not append to {self.path}: {e.strerror}') from e
