"""The gateway's kept copies: least recently used, admitted as TinyLFU admits."""

from __future__ import annotations

from imagecache.keptcopies import MIN_FREQUENCY_SAMPLE, KeptCopies, prepared

BODY = bytes(1000)
COPY_SIZE = prepared(1, "image/png", BODY).size  # the body and its header lines
FITS_THREE = 3 * COPY_SIZE + COPY_SIZE // 2  # room for three copies, not four


def read(copies: KeptCopies, key: str, version: int = 1) -> None:
    """What the fast path does for a read: the copy, or else the image read
    the full way, kept if worth it."""
    image = copies.get(key)
    if image is None or image.version < version:
        copies.keep(key, version, "image/png", BODY, from_node=True)


def kept(copies: KeptCopies) -> set[str]:
    return {key for key in "abcde" if key in copies}


def test_while_there_is_room_every_image_loaded_is_kept() -> None:
    copies = KeptCopies(FITS_THREE)
    for key in "abc":
        read(copies, key)
    assert kept(copies) == {"a", "b", "c"}


def test_a_key_loaded_once_does_not_evict_copies_loaded_as_often_or_more() -> None:
    copies = KeptCopies(FITS_THREE)
    for key in "abc":
        read(copies, key)
    for key in "de":  # a working set larger than the copies: every read a miss
        read(copies, key)
    assert kept(copies) == {"a", "b", "c"}


def test_a_key_loaded_more_often_than_the_next_to_go_replaces_it() -> None:
    copies = KeptCopies(FITS_THREE)
    for key in "abc":
        read(copies, key)
    read(copies, "d")  # not kept: once, like "a"
    read(copies, "d")  # twice: more than "a", the least recently used
    assert kept(copies) == {"b", "c", "d"}


def test_a_newer_version_of_a_kept_key_is_always_kept() -> None:
    copies = KeptCopies(FITS_THREE)
    for key in "abc":
        read(copies, key)
        read(copies, key)
    read(copies, "a", version=2)
    image = copies.get("a")
    assert image is not None
    assert image.version == 2


def test_reads_of_kept_copies_count_too() -> None:
    """A copy read often (hits, never loaded again) outweighs keys read less."""
    copies = KeptCopies(FITS_THREE)
    for key in "abc":
        read(copies, key)
    for _ in range(4):
        read(copies, "a")  # hits: read 5 times in all
    read(copies, "b")  # twice; "c" (once) is now the least recently used
    for _ in range(2):
        read(copies, "d")  # twice: more than "c"
    assert kept(copies) == {"a", "b", "d"}
    for _ in range(3):
        read(copies, "e")  # "a" is next to go, but was read 5 times
    assert kept(copies) == {"a", "b", "d"}


def test_the_counts_age_so_what_was_hot_long_ago_gives_way() -> None:
    copies = KeptCopies(FITS_THREE)
    for key in "abc":
        for _ in range(3):
            read(copies, key)
    # Loads of other keys, none kept (each once), for two periods of
    # counting: the reads of "a" (3) are forgotten, below a key now loaded twice.
    for number in range(2 * MIN_FREQUENCY_SAMPLE):
        read(copies, f"other-{number}")
    read(copies, "d")
    read(copies, "d")
    assert "d" in kept(copies)
    assert "a" not in kept(copies)


def test_the_period_before_weighs_half() -> None:
    copies = KeptCopies(FITS_THREE)
    for key in "abc":
        for _ in range(4):
            read(copies, key)
    # One period of counting ends: "a", "b" and "c" now weigh 4 // 2 = 2 each.
    for number in range(MIN_FREQUENCY_SAMPLE - 12):
        read(copies, f"other-{number}")
    read(copies, "d")
    read(copies, "d")  # weighs 2: not more than "a", the next to go
    assert kept(copies) == {"a", "b", "c"}
    read(copies, "d")  # 3
    assert kept(copies) == {"b", "c", "d"}


def test_reads_of_keys_with_no_image_are_not_counted() -> None:
    """Only reads of images count: a client asking for keys that do not exist
    (404s) neither grows the counts nor earns a key its place."""
    copies = KeptCopies(FITS_THREE)
    for key in "abc":
        read(copies, key)
    for _ in range(5):
        assert copies.get("d") is None  # "d" has no image yet: answered 404
    read(copies, "d")  # now it has one: its first read
    assert kept(copies) == {"a", "b", "c"}


def test_a_new_copy_must_outweigh_every_copy_it_would_evict() -> None:
    copies = KeptCopies(10 * COPY_SIZE + COPY_SIZE // 2)  # ten copies
    big = bytes(2 * len(BODY))  # takes the room of two
    read(copies, "a0")
    read(copies, "a1")
    for _ in range(5):
        read(copies, "a1")  # hits: read 6 times in all
    for number in range(2, 10):
        read(copies, f"a{number}")  # "a0" and then "a1" are the next to go
    for _ in range(2):  # twice: more than "a0", less than "a1"
        if copies.get("big") is None:
            copies.keep("big", 1, "image/png", big, from_node=True)
    assert "big" not in copies
    assert "a0" in copies
    assert "a1" in copies


def test_an_image_that_missed_its_node_is_answered_but_not_kept_its_read_counted() -> None:
    copies = KeptCopies(FITS_THREE)
    for key in "abc":
        read(copies, key)
    for _ in range(3):
        answer = copies.keep("d", 1, "image/png", BODY, from_node=False)
        assert (answer.body, answer.version) == (BODY, 1)
    assert kept(copies) == {"a", "b", "c"}
    # Its reads counted all the same: read often, its next hit takes a place.
    read(copies, "d")
    assert "d" in copies


def test_dropping_a_version_leaves_a_copy_of_another() -> None:
    copies = KeptCopies(FITS_THREE)
    read(copies, "a", version=2)
    copies.drop("a", 1)  # a CHECK that came back about an older copy
    assert "a" in copies
    copies.drop("a", 2)
    assert "a" not in copies
    assert copies.used == 0


def test_a_newer_image_loaded_from_the_store_takes_the_older_copy_away() -> None:
    copies = KeptCopies(FITS_THREE)
    read(copies, "a", version=1)
    copies.keep("a", 2, "image/png", BODY, from_node=False)
    assert "a" not in copies  # outdated, and the newer one not kept
    assert copies.used == 0
