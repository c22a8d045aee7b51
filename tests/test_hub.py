"""Hub: names, URLs and downloads against an HTTP server the test runs on 127.0.0.1."""
import http.server
import io
import os
import re
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from vit_jax_ft import checkpoint, hub
from vit_jax_ft.models import AUGREG_NAMES, MODEL_SPECS


class Handler(http.server.BaseHTTPRequestHandler):
  """Serves `server.files`, honours `Range: bytes=N-`, records every request."""

  def do_GET(self):  # pylint: disable=invalid-name
    server = self.server
    server.requests.append((self.path, self.headers.get('Range')))
    body = server.files.get(self.path)
    if body is None:
      self.send_error(404)
      return
    announced = len(body) + server.extra_announced.get(self.path, 0)
    range_match = re.fullmatch(r'bytes=(\d+)-', self.headers.get('Range') or '')
    if range_match and server.ranges:
      start = int(range_match.group(1))
      if start >= len(body):
        self.send_response(416)
        self.send_header('Content-Range', f'bytes */{len(body)}')
        self.send_header('Content-Length', '0')
        self.end_headers()
        return
      self.send_response(206)
      self.send_header('Content-Range', f'bytes {start}-{len(body) - 1}/{len(body)}')
      self.send_header('Content-Length', str(len(body) - start))
      body = body[start:]
    else:
      self.send_response(200)
      self.send_header('Content-Length', str(announced))
    self.end_headers()
    cut = server.cut_next.pop(self.path, None)
    sent = body[:cut] if cut is not None else body
    self.wfile.write(sent)
    server.bytes_sent += len(sent)

  def log_message(self, *args):
    del args


@pytest.fixture
def server(monkeypatch):
  """A local hub: `server.url`, `server.files[path] = bytes`; `VIT_JAX_FT_HUB_URL` points at it."""
  httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Handler)
  httpd.files, httpd.requests, httpd.bytes_sent = {}, [], 0
  httpd.extra_announced, httpd.cut_next, httpd.ranges = {}, {}, True
  httpd.url = f'http://127.0.0.1:{httpd.server_address[1]}'
  thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
  thread.start()
  monkeypatch.setenv(hub.HUB_URL_ENV, httpd.url)
  yield httpd
  httpd.shutdown()
  httpd.server_close()


def npz_bytes(seed=0, size=50_000):
  """A small real .npz file (content is irrelevant to the hub)."""
  buffer = io.BytesIO()
  np.savez(buffer, **{'a/kernel': np.random.default_rng(seed).standard_normal(size // 8)})
  return buffer.getvalue()


def closed_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def test_names_map_to_the_official_urls(monkeypatch):
  monkeypatch.delenv(hub.HUB_URL_ENV, raising=False)
  gcs = 'https://storage.googleapis.com'
  assert hub.checkpoint_url('imagenet21k/ViT-B_16') == f'{gcs}/vit_models/imagenet21k/ViT-B_16.npz'
  assert (hub.checkpoint_url('imagenet21k+imagenet2012/ViT-L_16-224.npz') ==
          f'{gcs}/vit_models/imagenet21k+imagenet2012/ViT-L_16-224.npz')
  assert hub.checkpoint_url('BiT-M-R50x1-ILSVRC2012') == f'{gcs}/bit_models/BiT-M-R50x1-ILSVRC2012.npz'
  assert hub.checkpoint_url('BiT-S-R152x4') == f'{gcs}/bit_models/BiT-S-R152x4.npz'
  filename = 'R26_S_32-i21k-300ep-lr_0.001-aug_light1-wd_0.1-do_0.0-sd_0.0'
  assert hub.checkpoint_url(f'augreg/{filename}') == f'{gcs}/vit_models/augreg/{filename}.npz'
  assert hub.checkpoint_url(filename) == f'{gcs}/vit_models/augreg/{filename}.npz'
  assert hub.checkpoint_url('augreg/R26_S_32') == f'{gcs}/vit_models/augreg/{filename}.npz'
  assert hub.checkpoint_url('BiT-M-R50x1', url='http://mirror/') == 'http://mirror/bit_models/BiT-M-R50x1.npz'
  monkeypatch.setenv(hub.HUB_URL_ENV, 'http://127.0.0.1:1')
  assert hub.checkpoint_url('BiT-M-R50x1') == 'http://127.0.0.1:1/bit_models/BiT-M-R50x1.npz'


def test_every_index_entry_names_a_registered_model():
  for c in hub.INDEX.values():
    assert c.model_name in MODEL_SPECS, c.name
  assert hub.lookup('augreg/B_16').model_name == AUGREG_NAMES['B_16'] == 'ViT-B_16'
  assert hub.lookup('augreg/R_Ti_16').model_name == 'R+ViT-Ti_16'
  assert hub.lookup('augreg/R26_S_32').model_name == 'R26+ViT-S_32'
  assert hub.lookup('imagenet21k+imagenet2012/ViT-B_16-224').model_name == 'ViT-B_16'
  assert hub.lookup('BiT-M-R101x3-ILSVRC2012').model_name == 'BiT-M-R101x3'
  assert 'BiT-S-R50x1-ILSVRC2012' not in hub.INDEX  # Only BiT-M comes fine-tuned on ILSVRC-2012.


def test_unknown_name_lists_close_names():
  with pytest.raises(hub.UnknownCheckpointError, match=r"imagenet21k/ViT-B16.*imagenet21k/ViT-B_16"):
    hub.lookup('imagenet21k/ViT-B16')
  with pytest.raises(hub.UnknownCheckpointError, match=r'BiT-M-R50x1'):
    hub.resolve('BiT-M-R50x2')


def test_fetch_downloads_into_the_bucket_layout(server, tmp_path):
  body = npz_bytes()
  server.files['/bit_models/BiT-M-R50x1.npz'] = body
  path = hub.fetch('BiT-M-R50x1', dest=str(tmp_path))
  assert path == str(tmp_path / 'bit_models' / 'BiT-M-R50x1.npz')
  assert (tmp_path / 'bit_models' / 'BiT-M-R50x1.npz').read_bytes() == body
  assert not list(tmp_path.rglob('*.partial'))
  assert server.requests == [('/bit_models/BiT-M-R50x1.npz', None)]
  assert hub.fetch('BiT-M-R50x1', dest=str(tmp_path)) == path  # Present: no new request.
  assert len(server.requests) == 1


def test_fetch_resumes_a_partial_file_with_a_range_request(server, tmp_path):
  body = npz_bytes(1)
  server.files['/vit_models/imagenet21k/ViT-B_16.npz'] = body
  target = tmp_path / 'imagenet21k' / 'ViT-B_16.npz'
  target.parent.mkdir()
  done = 12_345
  (tmp_path / 'imagenet21k' / 'ViT-B_16.npz.partial').write_bytes(body[:done])
  hub.fetch('imagenet21k/ViT-B_16', dest=str(tmp_path))
  assert target.read_bytes() == body
  assert server.requests == [('/vit_models/imagenet21k/ViT-B_16.npz', f'bytes={done}-')]
  assert server.bytes_sent == len(body) - done


def test_interrupted_download_is_kept_and_resumed(server, tmp_path):
  body = npz_bytes(2)
  path = '/vit_models/imagenet21k+imagenet2012/ViT-B_32.npz'
  server.files[path] = body
  server.cut_next[path] = 20_000  # The connection drops after 20 kB.
  partial = tmp_path / 'imagenet21k+imagenet2012' / 'ViT-B_32.npz.partial'
  with pytest.raises(hub.FetchError, match=f'received 20,000 bytes but the server announced '
                     f'{len(body):,}.*again to resume'):
    hub.fetch('imagenet21k+imagenet2012/ViT-B_32', dest=str(tmp_path))
  assert partial.read_bytes() == body[:20_000]
  hub.fetch('imagenet21k+imagenet2012/ViT-B_32', dest=str(tmp_path))
  assert (tmp_path / 'imagenet21k+imagenet2012' / 'ViT-B_32.npz').read_bytes() == body
  assert [r for _, r in server.requests] == [None, 'bytes=20000-']


def test_size_mismatch_is_an_error_and_nothing_is_renamed(server, tmp_path):
  body = npz_bytes(3)
  server.files['/bit_models/BiT-S-R50x1.npz'] = body
  server.extra_announced['/bit_models/BiT-S-R50x1.npz'] = 100
  with pytest.raises(hub.FetchError, match=f'received {len(body):,} bytes but the server '
                     f'announced {len(body) + 100:,}'):
    hub.fetch('BiT-S-R50x1', dest=str(tmp_path))
  assert not (tmp_path / 'bit_models' / 'BiT-S-R50x1.npz').exists()


def test_server_without_ranges_and_stale_partials_restart_from_zero(server, tmp_path):
  body = npz_bytes(4)
  server.files['/bit_models/BiT-M-R50x3.npz'] = body
  partial = tmp_path / 'bit_models' / 'BiT-M-R50x3.npz.partial'
  partial.parent.mkdir()
  partial.write_bytes(b'x' * (len(body) + 10))  # Longer than the file: the server answers 416.
  hub.fetch('BiT-M-R50x3', dest=str(tmp_path))
  assert (tmp_path / 'bit_models' / 'BiT-M-R50x3.npz').read_bytes() == body
  assert [r for _, r in server.requests] == [f'bytes={len(body) + 10}-', None]

  server.ranges = False
  server.files['/bit_models/BiT-M-R101x1.npz'] = body
  (tmp_path / 'bit_models' / 'BiT-M-R101x1.npz.partial').write_bytes(b'junk')
  hub.fetch('BiT-M-R101x1', dest=str(tmp_path))
  assert (tmp_path / 'bit_models' / 'BiT-M-R101x1.npz').read_bytes() == body


def test_non_npz_answer_is_rejected(server, tmp_path):
  server.files['/bit_models/BiT-M-R152x2.npz'] = b'<html>quota exceeded</html>'
  with pytest.raises(hub.FetchError, match='did not return an .npz'):
    hub.fetch('BiT-M-R152x2', dest=str(tmp_path))
  assert not list(tmp_path.rglob('BiT-M-R152x2*'))


def test_missing_remote_file_is_a_clear_error(server, tmp_path):
  with pytest.raises(hub.FetchError, match='HTTP 404'):
    hub.fetch('augreg/B_16-i21k-no-such-file', dest=str(tmp_path))


def test_unreachable_server_fails_fast_and_says_where_to_place_the_file(monkeypatch, tmp_path):
  url = f'http://127.0.0.1:{closed_port()}'
  monkeypatch.setenv(hub.HUB_URL_ENV, url)
  start = time.monotonic()
  with pytest.raises(hub.FetchError) as error:
    hub.fetch('imagenet21k/ViT-B_16', dest=str(tmp_path))
  assert time.monotonic() - start < 5
  message = str(error.value)
  assert f'{url}/vit_models/imagenet21k/ViT-B_16.npz' in message
  assert str(tmp_path / 'imagenet21k' / 'ViT-B_16.npz') in message


def test_resolve_paths_names_and_offline_hint(server, tmp_path):
  local = tmp_path / 'mine.npz'
  local.write_bytes(npz_bytes())
  assert hub.resolve(str(local)) == str(local)
  assert hub.resolve('gs://bucket/x.npz') == 'gs://bucket/x.npz'
  with pytest.raises(FileNotFoundError, match='python -m vit_jax_ft.hub fetch BiT-M-R50x1'):
    hub.resolve('BiT-M-R50x1', dest=str(tmp_path), fetch_missing=False)
  assert server.requests == []
  server.files['/bit_models/BiT-M-R50x1.npz'] = npz_bytes(5)
  path = hub.resolve('BiT-M-R50x1', dest=str(tmp_path))
  assert open(path, 'rb').read() == server.files['/bit_models/BiT-M-R50x1.npz']
  assert hub.resolve('BiT-M-R50x1', dest=str(tmp_path), fetch_missing=False) == path


def test_augreg_index_csv_is_read_when_reachable(server):
  filename = 'S_16-i21k-300ep-lr_0.001-aug_medium2-wd_0.1-do_0.1-sd_0.1'
  server.files['/vit_models/augreg/index.csv'] = (
      'name,filename,adapt_filename\n'
      f'S/16,{filename},{filename}--cifar100-steps_2k-lr_0.01-res_384\n').encode()
  names, from_index = hub.list_checkpoints()
  assert from_index and f'augreg/{filename}' in [c.name for c in names]
  assert all(n in [c.name for c in names] for n in hub.INDEX)
  del server.files['/vit_models/augreg/index.csv']
  names, from_index = hub.list_checkpoints()
  assert not from_index and [c.name for c in names] == list(hub.INDEX)


def test_checkpoint_load_reads_a_url(server, tmp_path):
  tree = {'embedding': {'kernel': np.arange(6.0).reshape(1, 1, 2, 3)}, 'cls': np.ones((1, 1, 3))}
  checkpoint.save(tree, str(tmp_path / 'x.npz'))
  server.files['/x.npz'] = (tmp_path / 'x.npz').read_bytes()
  loaded = checkpoint.load(f'{server.url}/x.npz')
  np.testing.assert_array_equal(loaded['embedding']['kernel'], tree['embedding']['kernel'])
  np.testing.assert_array_equal(loaded['cls'], tree['cls'])
  with pytest.raises(FileNotFoundError, match='Could not download'):
    checkpoint.load(f'{server.url}/absent.npz')


def test_command_line_list_and_fetch(server, tmp_path):
  server.files['/bit_models/BiT-M-R50x1-ILSVRC2012.npz'] = body = npz_bytes(6)
  env = dict(os.environ, **{hub.HUB_URL_ENV: server.url})
  run = lambda *args: subprocess.run(
      [sys.executable, '-m', 'vit_jax_ft.hub', *args, f'--dest={tmp_path}'],
      capture_output=True, text=True, env=env, timeout=120, check=False)
  fetched = run('fetch', 'BiT-M-R50x1-ILSVRC2012')
  assert fetched.returncode == 0, fetched.stderr
  assert (tmp_path / 'bit_models' / 'BiT-M-R50x1-ILSVRC2012.npz').read_bytes() == body
  listed = run('list', '--filter=BiT-M-R50x1')
  assert listed.returncode == 0, listed.stderr
  rows = [line.split() for line in listed.stdout.splitlines()[1:] if 'BiT' in line]
  assert rows == [['BiT-M-R50x1', 'BiT-M-R50x1'],
                  ['*', 'BiT-M-R50x1', 'BiT-M-R50x1-ILSVRC2012']]
  unknown = run('fetch', 'BiT-M-R50x2')
  assert unknown.returncode == 1 and 'Did you mean' in unknown.stderr


def _augreg_row(filename, ds='i21k', final_val='0.5'):
  return f'x,{ds},{final_val},{filename},{filename}--cifar100-steps_2k-lr_0.01-res_384\n'


def test_augreg_short_name_picks_the_best_i21k_checkpoint_of_index_csv(server, tmp_path):
  best = 'B_16-i21k-300ep-lr_0.001-aug_strong2-wd_0.1-do_0.1-sd_0.1'
  assert f'augreg/{best}' not in hub.INDEX  # Not the README's choice.
  server.files['/vit_models/augreg/index.csv'] = (
      'name,ds,final_val,filename,adapt_filename\n'
      + _augreg_row('B_16-i21k-300ep-lr_0.001-aug_none-wd_0.03-do_0.0-sd_0.0', final_val='0.41')
      + _augreg_row(best, final_val='0.47') + _augreg_row(best, final_val='0.47')
      + _augreg_row('B_16-i1k-300ep-lr_0.001-aug_medium2-wd_0.1-do_0.0-sd_0.0', 'i1k', '0.8')
      + _augreg_row('B_160-i21k-300ep-lr_0.001-aug_none-wd_0.1-do_0.0-sd_0.0', final_val='0.9')
      + _augreg_row('S_16-i21k-300ep-lr_0.001-aug_light1-wd_0.03-do_0.0-sd_0.0', final_val='0.9')
  ).encode()
  for name in ('augreg/B_16', 'B_16'):
    picked = hub.pick(name)
    assert picked.name == f'augreg/{best}' and picked.model_name == 'ViT-B_16'
  server.files[f'/vit_models/augreg/{best}.npz'] = npz_bytes(4)
  path = hub.resolve('augreg/B_16', dest=str(tmp_path))
  assert path == str(tmp_path / 'augreg' / f'{best}.npz')
  assert open(path, 'rb').read() == server.files[f'/vit_models/augreg/{best}.npz']
  # No i21k row for the model: the built-in table.
  assert hub.pick('augreg/B_8').name == f'augreg/{hub.AUGREG_RECOMMENDED["B_8"][0]}'


def test_augreg_short_names_offline_use_the_built_in_table(server):
  assert '/vit_models/augreg/index.csv' not in server.files  # 404, as when unreachable.
  for model, (upstream, _) in hub.AUGREG_RECOMMENDED.items():
    picked = hub.pick(f'augreg/{model}')
    assert picked.name == f'augreg/{upstream}'
    assert picked.model_name == AUGREG_NAMES[model] and picked.model_name in MODEL_SPECS
  assert hub.pick('augreg/B_8').model_name == 'ViT-B_8'
  assert f'augreg/{hub.AUGREG_RECOMMENDED["B_8"][0]}' in hub.INDEX
  # Every AugReg model of the official README has a short name.
  assert set(hub.AUGREG_RECOMMENDED) == {'Ti_16', 'S_16', 'B_16', 'L_16', 'S_32', 'B_32', 'B_8',
                                         'R_Ti_16', 'R26_S_32', 'R50_L_32'}


def test_models_without_augreg_checkpoints_are_not_short_names(server):
  for name in ('augreg/R26_B_32', 'augreg/L_32', 'augreg/H_14'):
    with pytest.raises(hub.UnknownCheckpointError):
      hub.pick(name)
