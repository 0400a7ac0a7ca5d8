"""A short soak through the real server (the full 200-prompt run is `python -m bench.soak`): mixed prompts of every
capability with changing batch sizes, resolutions and steps all succeed, a fixed-seed image is byte-identical at the
start and the end, and the server's RSS settles."""
from bench.soak import growth_after_warmup, soak


def test_mixed_prompts_all_succeed_and_memory_settles(client, server):
    stats = soak(client, server.proc.pid, 32, log=lambda *_: None)
    rss = stats["rss_mb"]
    print(f"\nsoak: 32 prompts in {stats['wall_s']:.0f} s, RSS {rss[0]:.0f} -> {rss[-1]:.0f} MB, growth after warm-up "
          f"{growth_after_warmup(rss):.1f} MB")
    assert stats["failed"] == []
    assert stats["identical"]
    assert growth_after_warmup(rss) < 50
