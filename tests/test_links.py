"""Link rewriting: only tracked links change, and URLs are stored as meant."""

from __future__ import annotations

import re
from datetime import UTC, datetime

import pytest
from sqlmodel import Session, select

from sequencer import links
from sequencer.models import Link
from tests.tracking_factories import make_sent_emailing

SENT = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)


def _track(url: str) -> str:
    return f"https://t.example/{len(url)}"


def test_double_quoted_http_link_is_rewritten() -> None:
    html = '<p><a href="https://shop.example.com/">Shop</a></p>'

    assert links.rewrite_links(html, _track) == (
        '<p><a href="https://t.example/25">Shop</a></p>'
    )


def test_single_quoted_and_unquoted_links_are_rewritten_keeping_quotes() -> None:
    html = "<a href='http://a.example/x'>A</a> <a href=http://b.example/y>B</a>"

    rewritten = links.rewrite_links(html, lambda url: "T")

    assert rewritten == "<a href='T'>A</a> <a href=\"T\">B</a>"


def test_tag_spanning_several_lines_is_rewritten() -> None:
    html = '<a\n  class="button"\n  HREF = "https://shop.example.com/sale"\n>Sale</a>'

    rewritten = links.rewrite_links(html, lambda url: "T")

    assert rewritten == '<a\n  class="button"\n  HREF = "T"\n>Sale</a>'
    assert links.find_links(html) == ["https://shop.example.com/sale"]


@pytest.mark.parametrize(
    "tag",
    [
        '<a href="mailto:shop@example.com?subject=Hi&amp;body=x">Write</a>',
        '<a href="tel:+33123456789">Call</a>',
        '<a href="#top">Top</a>',
        '<a href="/relative/page">Relative</a>',
        '<a href="ftp://files.example.com/a">FTP</a>',
        '<a name="anchor">Anchor</a>',
        '<a href="{unsubscribe_url}">Unsubscribe</a>',
        '<a data-notrack href="https://shop.example.com/">Skip</a>',
        '<a\n href="https://shop.example.com/"\n data-notrack="1">Skip</a>',
        '<a clicktracking="off" href="https://shop.example.com/">Skip</a>',
        '<!-- <a href="https://shop.example.com/">Commented</a> -->',
    ],
)
def test_untracked_links_stay_exactly_as_written(tag: str) -> None:
    html = f"<p>Before {tag} after</p>"

    assert links.rewrite_links(html, lambda url: "T") == html
    assert links.find_links(html) == []


def test_entities_in_href_are_decoded_in_the_stored_url() -> None:
    html = '<a href="https://shop.example.com/p?a=1&amp;b=2&#38;c=%C3%A9">P</a>'

    assert links.find_links(html) == ["https://shop.example.com/p?a=1&b=2&c=%C3%A9"]


def test_query_fragment_percent_encoding_and_non_ascii_are_preserved() -> None:
    url = "https://shop.example.com/caf%C3%A9/thé?q=a+b&x=%2F#section-2"
    html = f"<a href='{url}'>Thé</a>"

    assert links.find_links(html) == [url]


def test_whitespace_around_href_is_dropped() -> None:
    html = '<a href="\n  https://shop.example.com/a  \n">A</a>'

    assert links.find_links(html) == ["https://shop.example.com/a"]


def test_tracking_url_is_escaped_in_the_attribute() -> None:
    html = '<a href="https://shop.example.com/">A</a>'

    rewritten = links.rewrite_links(html, lambda url: "https://t.example/?a=1&b=2")

    assert rewritten == '<a href="https://t.example/?a=1&amp;b=2">A</a>'


def test_attribute_with_angle_bracket_does_not_end_the_tag() -> None:
    html = '<a title="a > b" href="https://shop.example.com/">A</a>'

    assert (
        links.rewrite_links(html, lambda url: "T") == '<a title="a > b" href="T">A</a>'
    )


def test_only_the_first_href_counts() -> None:
    html = '<a href="https://one.example/" href="https://two.example/">A</a>'

    assert links.find_links(html) == ["https://one.example/"]


def test_other_tags_with_href_are_left_alone() -> None:
    html = (
        '<link href="https://cdn.example/s.css" rel="stylesheet">'
        '<abbr href="https://x.example/">A</abbr><area href="https://y.example/">'
    )

    assert links.rewrite_links(html, lambda url: "T") == html


def test_find_links_lists_each_url_once_in_order() -> None:
    html = (
        '<a href="https://b.example/">1</a><a href="https://a.example/">2</a>'
        '<a href="https://b.example/">3</a>'
    )

    assert links.find_links(html) == ["https://b.example/", "https://a.example/"]


def test_pixel_goes_before_the_closing_body_tag() -> None:
    html = "<html><body><p>Hi</p></BODY></html>"

    with_pixel = links.add_pixel(html, "https://t.example/o/x?a=1&b=2")

    assert with_pixel.startswith("<html><body><p>Hi</p><img ")
    assert 'src="https://t.example/o/x?a=1&amp;b=2"' in with_pixel
    assert with_pixel.endswith("</BODY></html>")


def test_pixel_is_appended_to_a_fragment_without_body() -> None:
    with_pixel = links.add_pixel("<p>Hi</p>", "https://t.example/o/x")

    assert with_pixel.startswith("<p>Hi</p><img ")
    assert 'width="1" height="1"' in with_pixel


def test_each_distinct_url_is_stored_once_per_emailing(session: Session) -> None:
    emailing, _ = make_sent_emailing(session, recipients=1, sent_at=SENT)
    other, _ = make_sent_emailing(session, recipients=1, sent_at=SENT, first_contact=5)
    url = "https://shop.example.com/p?a=1&b=thé#x"

    first = links.link_id_for(session, emailing.id, url)
    again = links.link_id_for(session, emailing.id, url)
    elsewhere = links.link_id_for(session, other.id, url)
    session.commit()

    rows = session.exec(select(Link).order_by(Link.id)).all()
    assert first == again != elsewhere
    assert [(row.emailing_id, row.url) for row in rows] == [
        (emailing.id, url),
        (other.id, url),
    ]
    assert rows[0].url_hash == links.url_hash(url)


def _holes(html: str) -> list[tuple[int, int]]:
    return [(match.start(), match.end()) for match in re.finditer("@@", html)]


@pytest.mark.parametrize(
    "html",
    [
        '<p>@@</p><a href="https://x.example/">x</a> @@',
        "@@<a href='https://x.example/'>x</a>",
        "<p title='a>b'>text</p> @@",
    ],
)
def test_holes_in_text_leave_the_links_put(html: str) -> None:
    assert links.links_stay_put(html, _holes(html))


@pytest.mark.parametrize(
    "html",
    [
        '<a href="https://x.example/?u=@@">x</a>',
        '<a title="@@" href="https://x.example/">x</a>',
        "<!-- @@ --><a href='https://x.example/'>x</a>",
        "<@@ href='https://x.example/'>x</a>",
        "<a title=\"a>b\" href='@@'>x</a>",
    ],
)
def test_holes_in_tags_or_comments_may_move_the_links(html: str) -> None:
    assert not links.links_stay_put(html, _holes(html))


def test_a_whole_href_hole_may_be_allowed() -> None:
    html = '<a href="@@">Leave</a>'

    assert links.links_stay_put(html, _holes(html), whole_hrefs=_holes(html))
    assert not links.links_stay_put(html, _holes(html))
