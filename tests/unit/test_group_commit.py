"""Group commit (shared/intake/group_commit.py): POSTs that arrive while a write is in flight share
the next write, each gets back exactly its own requests under the shared post's ids, a failed write
fails every POST in it and nobody else, and nothing waits for ever."""
from __future__ import annotations

import threading
import time

import pytest

from shared.intake.group_commit import GroupCommit


class Writes:
    """A post writer that records each write and can be held or made to fail."""

    def __init__(self) -> None:
        self.posts: list[list[str]] = []
        self.held = threading.Event()
        self.held.set()
        self.started = threading.Event()
        self.fail_next = False
        self.lock = threading.Lock()

    def __call__(self, requests: list[str]) -> list[str]:
        with self.lock:
            self.posts.append(list(requests))
            number, fail, self.fail_next = len(self.posts), self.fail_next, False
        self.started.set()
        assert self.held.wait(10)
        if fail:
            raise RuntimeError(f"write {number} failed")
        return [f"post{number}/{index}:{request}" for index, request in enumerate(requests)]


def submit_in_thread(commits: GroupCommit, requests: list[str], write: Writes, answers: dict) -> threading.Thread:
    def run() -> None:
        try:
            answers[requests[0]] = commits.submit(requests, len(requests), write)
        except RuntimeError as exc:
            answers[requests[0]] = exc
    thread = threading.Thread(target=run)
    thread.start()
    return thread


def wait_for_waiters(commits: GroupCommit, count: int) -> None:
    deadline = time.monotonic() + 5
    while len(commits._waiting) < count and time.monotonic() < deadline:
        time.sleep(0.005)
    assert len(commits._waiting) == count


def test_a_post_alone_is_written_at_once_on_its_own():
    write = Writes()
    assert GroupCommit(1000).submit(["a", "b"], 2, write) == ["post1/0:a", "post1/1:b"]
    assert write.posts == [["a", "b"]]


def test_posts_arriving_during_a_write_share_the_next_one_and_each_gets_its_own_ids():
    commits, write, answers = GroupCommit(1000), Writes(), {}
    write.held.clear()
    first = submit_in_thread(commits, ["a"], write, answers)
    assert write.started.wait(5)
    later = [submit_in_thread(commits, [name, name + "2"], write, answers) for name in ("b", "c", "d")]
    wait_for_waiters(commits, 3)
    write.held.set()
    for thread in [first, *later]:
        thread.join(10)
        assert not thread.is_alive()
    assert write.posts[0] == ["a"]
    assert len(write.posts) == 2 and sorted(write.posts[1]) == ["b", "b2", "c", "c2", "d", "d2"]
    assert answers["a"] == ["post1/0:a"]
    for name in ("b", "c", "d"):
        offset = write.posts[1].index(name)
        assert answers[name] == [f"post2/{offset}:{name}", f"post2/{offset + 1}:{name}2"]


def test_a_failed_write_fails_every_post_in_it_and_the_next_write_still_happens():
    commits, write, answers = GroupCommit(1000), Writes(), {}
    write.held.clear()
    first = submit_in_thread(commits, ["a"], write, answers)
    assert write.started.wait(5)
    write.fail_next = True  # the second write: the one b and c share
    behind = [submit_in_thread(commits, [name], write, answers) for name in ("b", "c")]
    wait_for_waiters(commits, 2)
    write.held.set()
    for thread in [first, *behind]:
        thread.join(10)
        assert not thread.is_alive()
    assert answers["a"] == ["post1/0:a"]
    assert [str(answers[name]) for name in ("b", "c")] == ["write 2 failed"] * 2
    assert commits.submit(["e"], 1, write) == ["post3/0:e"]


def test_a_shared_post_stays_within_the_size_limit_and_a_larger_post_goes_alone():
    commits, write, answers = GroupCommit(max_size=4), Writes(), {}
    write.held.clear()
    first = submit_in_thread(commits, ["a"], write, answers)
    assert write.started.wait(5)
    behind = []
    for requests in (["b", "b2", "b3"], ["c", "c2"], ["d"] * 5, ["e"]):
        behind.append(submit_in_thread(commits, requests, write, answers))
        wait_for_waiters(commits, len(behind))
    write.held.set()
    for thread in [first, *behind]:
        thread.join(10)
        assert not thread.is_alive()
    assert [len(post) for post in write.posts] == [1, 3, 2, 5, 1]
    assert all(not isinstance(answer, Exception) for answer in answers.values())


@pytest.mark.parametrize("clients", [8])
def test_many_concurrent_posts_all_finish_and_none_is_written_twice(clients):
    commits, write = GroupCommit(1000), Writes()
    answers: dict = {}
    threads = [submit_in_thread(commits, [f"r{n}"], write, answers) for n in range(clients * 25)]
    for thread in threads:
        thread.join(10)
        assert not thread.is_alive()
    written = [request for post in write.posts for request in post]
    assert sorted(written) == sorted(f"r{n}" for n in range(clients * 25))
    assert all(answers[f"r{n}"][0].endswith(f":r{n}") for n in range(clients * 25))
