"""The cloud's checkpoint and journal (``server.checkpoint``): a restarted cloud resumes with every
acknowledged upload, the same learners and versions above any it published; a torn journal tail
is dropped; a checkpoint from another setup is refused. In-process servers on loopback, tiny models.
The kill -9 of a real cloud process with a real edge carrying on is ``test_cloud_kill9``."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from core.cema import CemaConfig
from core.export import Preprocess
from core.models import create_model
from protos.codec import decode_state, encode_array
from protos.fedshift.v1 import edge_pb2 as pb
from server.checkpoint import VERSION_BLOCK, Journal, Kind, journal_generations, read_journal, remove_journals_before
from server.cloud import CloudConfig, CloudServer

from _cloud_run import RunningCloud

SIZE = 16
TOKEN = "tok-never-on-disk"


@pytest.fixture(scope="module")
def models() -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    student = create_model("edge_cnn", 10, image_size=SIZE, width=8)
    teacher = create_model("teacher_resnet", 10, image_size=SIZE, width=8, blocks=1)
    g = torch.Generator().manual_seed(1)
    for model in (student, teacher):  # non-trivial running statistics
        model.train()
        with torch.no_grad():
            model(torch.randn(16, 3, SIZE, SIZE, generator=g) + 0.3)
        model.eval()
    return student, teacher


def _config(directory: Path, **kw) -> CloudConfig:
    kw.setdefault("cema", CemaConfig(batch_size=4, replay_start=8))
    return CloudConfig(image_size=SIZE, port=0, insecure=True, token=TOKEN, checkpoint_dir=str(directory),
                       checkpoint_every_s=kw.pop("every", 0.0), **kw)


class _Cloud(RunningCloud):
    """A started server and a stub, with the calls these tests make."""

    def register(self, edge: str) -> pb.RegisterReply:
        return self.stub.Register(pb.RegisterRequest(edge_id=edge, auth_token=TOKEN), timeout=10)

    def upload(self, edge: str, seq: int, n: int = 4, episode: int = 0) -> pb.UploadReply:
        images = np.random.default_rng(1000 * seq + n).integers(0, 256, (n, SIZE, SIZE, 3), dtype=np.uint8)
        return self.stub.Upload(pb.UploadRequest(edge_id=edge, sequence=seq, images=encode_array(images),
                                                 entropies=[0.5] * n, labels=list(range(n)), auth_token=TOKEN,
                                                 seen=10 * (seq + 1), episode=episode), timeout=20)

    def reset(self, edge: str, episode: int) -> pb.ResetReply:
        return self.stub.Reset(pb.ResetRequest(edge_id=edge, episode=episode, auth_token=TOKEN), timeout=20)

    def newest(self, edge: str, after: int) -> pb.ParameterUpdate:
        stream = self.stub.Subscribe(pb.SubscribeRequest(edge_id=edge, after_version=after, auth_token=TOKEN),
                                     timeout=20)
        update = next(stream)
        stream.cancel()
        return update


def _traffic(cloud: _Cloud) -> None:
    """Two edges: accepted uploads, a duplicate, an episode change, a stale upload."""
    cloud.register("e1")
    cloud.register("e2")
    for seq in range(5):
        assert cloud.upload("e1", seq).accepted == 4
    assert cloud.upload("e1", 3).duplicate
    assert cloud.reset("e1", 1).episode == 1
    for seq in (5, 6):
        assert cloud.upload("e1", seq, n=6, episode=1).accepted == 6
    assert cloud.upload("e1", 7, episode=0).accepted == 0  # a past episode: acknowledged, not learned
    for seq in range(3):
        assert cloud.upload("e2", seq, n=5).accepted == 5
    assert cloud.server.service.wait_idle(60)


def _counters(stats) -> dict:
    return {name: (e.uploads, e.samples, e.stale_samples, e.seen, e.episode) for name, e in stats.edges.items()}


def test_a_cleanly_stopped_cloud_restarts_where_it_stood(models, tmp_path: Path) -> None:
    with _Cloud(models, _config(tmp_path / "ckpt")) as cloud:
        _traffic(cloud)
        before = cloud.server.service.stats()
        state = cloud.server.service.learner("e1").norm_state()
        replay = cloud.server.service.learner("e1").replay.contents()
    assert (tmp_path / "ckpt" / "snapshot.pt").is_file()  # taken at shutdown
    with _Cloud(models, _config(tmp_path / "ckpt")) as cloud:
        after = cloud.server.service.stats()
        assert _counters(after) == _counters(before) and after.restored_records == 0
        assert (after.uploads, after.samples) == (before.uploads, before.samples) == (10, 47)
        assert after.learners["e2"].queue == before.learners["e2"].queue == 3  # 15 samples, steps of 4
        learner = cloud.server.service.learner("e1")
        for name, value in state.items():
            np.testing.assert_array_equal(learner.norm_state()[name], value)
        assert learner.replay.contents().equal(replay)
        # versions resume above any published before; the newest update carries the saved state
        v1 = before.learners["e1"].version
        assert after.learners["e1"].version == v1 + 1 == cloud.register("e1").version
        update = cloud.newest("e1", after=v1)
        assert update.version == v1 + 1 and update.episode == 1
        for name, value in decode_state(update.tensors).items():
            np.testing.assert_array_equal(value, state[name])
        assert cloud.register("e1").next_sequence == 8 and cloud.register("e2").next_sequence == 3
        assert cloud.upload("e1", 4, episode=1).duplicate  # sequences survived too
        assert cloud.upload("e1", 8, episode=1).accepted == 4


def test_the_journal_alone_restores_every_acknowledged_upload(models, tmp_path: Path) -> None:
    """A copy of the folder taken while the cloud runs is what a kill -9 leaves: no snapshot yet,
    only the journal, written before each acknowledgement; a torn last record is dropped."""
    with _Cloud(models, _config(tmp_path / "live")) as cloud:
        _traffic(cloud)
        crashed = cloud.server.service.stats()
        shutil.copytree(tmp_path / "live", tmp_path / "crashed")
    (journal,) = (tmp_path / "crashed").glob("journal-*.log")
    assert TOKEN.encode() not in journal.read_bytes()  # secrets never reach the disk
    with journal.open("ab") as f:
        f.write(b"\x40\x00\x00\x00\x12\x34")  # the process died in the middle of a record
    assert not (tmp_path / "crashed" / "snapshot.pt").exists()
    with _Cloud(models, _config(tmp_path / "crashed")) as cloud:
        service = cloud.server.service
        restored = service.stats()
        assert _counters(restored) == _counters(crashed)
        # registrations, accepted and stale uploads, the reset, a version ceiling per learner
        assert restored.restored_records == 2 + 11 + 1 + 2
        assert service.wait_idle(60)
        learned = service.stats().learners
        # every accepted sample of the current episode reaches the learner again, once
        assert learned["e1"].learned_samples == 12 and learned["e2"].learned_samples == 15
        # the first publication reserved a block of versions: the restart resumes above all of it
        assert crashed.learners["e1"].version < VERSION_BLOCK < restored.learners["e1"].version
        assert cloud.register("e1").next_sequence == 8
        assert restored.checkpoints == 1  # a fresh snapshot right after the restore ...
    # the replayed journal (0) is gone; generation 1 opened at the restore, 2 and 3 at its two snapshots
    assert journal_generations(tmp_path / "crashed") == [3]


def test_a_checkpoint_from_another_setup_is_refused(models, tmp_path: Path) -> None:
    with _Cloud(models, _config(tmp_path / "ckpt")) as cloud:
        cloud.register("e1")
        cloud.upload("e1", 0)
    server = CloudServer(models[0], models[1], _config(tmp_path / "ckpt", shared=True), preprocess=Preprocess())
    with pytest.raises(ValueError, match="set up differently.*shared"):
        server.start()
    server.stop()


def test_journal_records_rotation_and_torn_tails(tmp_path: Path) -> None:
    journal = Journal(tmp_path, 3)
    journal.append(Kind.UPLOAD, b"abc")
    journal.append_json(Kind.RESET, {"edge_id": "e", "episode": 2})
    assert journal.rotate() == 4
    journal.append(Kind.CEILING, b"{}")
    journal.close()
    assert list(read_journal(tmp_path, 3)) == [(Kind.UPLOAD, b"abc"), (Kind.RESET, b'{"edge_id": "e", "episode": 2}'),
                                              (Kind.CEILING, b"{}")]
    assert list(read_journal(tmp_path, 4)) == [(Kind.CEILING, b"{}")]
    path = tmp_path / "journal-00000003.log"
    data = path.read_bytes()
    path.write_bytes(data[:-2])  # the second record torn: the first survives
    assert [k for k, _ in read_journal(tmp_path, 3)] == [Kind.UPLOAD, Kind.CEILING]
    flipped = bytearray(data)
    flipped[9] ^= 0xFF  # a corrupt payload: its checksum fails, the rest of that file is dropped
    path.write_bytes(bytes(flipped))
    assert [k for k, _ in read_journal(tmp_path, 3)] == [Kind.CEILING]
    remove_journals_before(tmp_path, 4)
    assert journal_generations(tmp_path) == [4]


def test_a_restarted_edge_resumes_with_the_newest_parameters_and_its_next_sequence(models, tmp_path: Path) -> None:
    """An edge keeps no state of its own: a new process (a fresh runtime from the same file)
    registering under the same id continues the cloud's sequence and receives its newest version."""
    from core.export import export_onnx
    from edge.client import CloudClient
    from edge.node import EdgeNode, NodeConfig
    from edge.runtime import EdgeRuntime
    from edge.selection import EntropySelector, SelectionConfig
    from edge.sources import EdgeBatch

    path = tmp_path / "edge.onnx"
    export_onnx(models[0], path, (3, SIZE, SIZE), model_name="edge_cnn", batch_stats=True)
    rng = np.random.default_rng(0)
    batches = [EdgeBatch(rng.integers(0, 256, (8, SIZE, SIZE, 3), dtype=np.uint8), None, "fog", 5, False)
               for _ in range(10)]

    def run_edge(address: str, part: list) -> tuple:
        runtime = EdgeRuntime(path)
        selector = EntropySelector(SelectionConfig(num_classes=10, method="all"))
        with CloudClient(address, "e1", TOKEN) as client:
            node = EdgeNode(runtime, part, client, selector, config=NodeConfig(sync_timeout_s=20))
            return node.run(), runtime

    with _Cloud(models, _config(tmp_path / "ckpt", lockstep=True)) as cloud:
        address = f"127.0.0.1:{cloud.server.port}"
        first, _ = run_edge(address, batches[:6])
        assert cloud.server.service.wait_idle(60)
        version = cloud.server.service.stats().learners["e1"].version
        assert first.uploads == 6 and version == first.final_version == 12  # 48 samples, steps of 4
        second, runtime = run_edge(address, batches[6:])  # the edge process restarted
        stats = cloud.server.service.stats()
    assert second.duplicates == 0 and second.uploads == 4  # sequences 6..9: its next ones, none re-used
    assert stats.edges["e1"].uploads == 10 and stats.edges["e1"].samples == 80
    # its first prediction may still use the file's parameters; from the first update on, the newest
    assert second.updates.stale_ignored == 0 and min(v for v in second.timeline.version if v) >= version
    assert runtime.version == second.final_version == stats.learners["e1"].version == 20
