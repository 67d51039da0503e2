"""Multi-view evaluation: clip offsets, three crops, averaging."""
import pytest
import torch

from stop_fast.data import read_video_clip
from stop_fast.data.views import average_views, crop_positions, read_video_views, view_indices

from data_fixtures import write_video


def test_view_indices_cover_the_video():
    assert view_indices(24, 4, 1) == [[3, 9, 15, 21]]  # one clip: the evaluation centres
    two = view_indices(24, 4, 2)
    assert two == [[1, 7, 13, 19], [4, 10, 16, 22]]
    assert all(c == sorted(c) for c in view_indices(7, 8, 3))


def test_crop_positions_follow_the_long_side():
    assert crop_positions(48, 64, 3) == [(0.5, 0.0), (0.5, 0.5), (0.5, 1.0)]
    assert crop_positions(64, 48, 3) == [(0.0, 0.5), (0.5, 0.5), (1.0, 0.5)]
    assert crop_positions(64, 48, 1) == [(0.5, 0.5)]


def test_views_of_a_landscape_video(tmp_path):
    path = write_video(tmp_path / "wide.mp4", num_frames=24, width=96, height=48)
    views = read_video_views(path, 4, size=32, num_clips=2, num_crops=3)
    assert views.shape == (6, 4, 3, 32, 32)
    single = read_video_views(path, 4, size=32)
    torch.testing.assert_close(single[0], read_video_clip(path, 4, size=32, mode="eval"))
    # left, centre and right crops differ (the moving square is somewhere)
    assert (views[0] - views[2]).abs().max() > 0.1
    with pytest.raises(ValueError, match="num_crops"):
        read_video_views(path, 4, num_crops=2)


def test_average_views():
    x = torch.arange(12.0).view(6, 2)
    torch.testing.assert_close(average_views(x, 3), torch.tensor([[2.0, 3.0], [8.0, 9.0]]))
    with pytest.raises(ValueError, match="multiple"):
        average_views(x, 4)


def test_loader_yields_every_view_of_each_video(tmp_path):
    from stop_fast.data.datasets import Sample, VideoDataset
    from stop_fast.data.loader import VideoLoader

    paths = [write_video(tmp_path / f"v{i}.mp4", num_frames=20 + 4 * i, width=80, height=48) for i in range(2)]
    (tmp_path / "broken.mp4").write_bytes(b"junk" * 64)
    ds = VideoDataset("fixture", "test", [Sample(str(p), 0) for p in paths] + [Sample(str(tmp_path / "broken.mp4"), 0)],
                      classes=["a"])
    batches = list(VideoLoader(ds, 3, 2, size=24, mode="eval", num_workers=0, num_clips=2, num_crops=3))
    assert [b["video"].shape for b in batches] == [(2, 6, 3, 3, 24, 24)] * 2
    assert torch.cat([b["valid"] for b in batches]).tolist() == [True, True, False, False]
    torch.testing.assert_close(batches[0]["video"][1], read_video_views(paths[1], 3, size=24, num_clips=2, num_crops=3))
    features = batches[0]["video"].flatten(0, 1).mean(dim=(1, 2, 3, 4))  # a stand-in model: one number per view
    torch.testing.assert_close(average_views(features, 6), batches[0]["video"].mean(dim=(1, 2, 3, 4, 5)))
    with pytest.raises(ValueError, match="eval"):
        VideoLoader(ds, 3, 2, mode="train", num_clips=2)
