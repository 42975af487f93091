"""Altair chart builders for the Statistics page.

Each takes a DataFrame exactly as ``sequencer.stats`` returns it and returns a
chart; none of them queries or computes a figure of its own.
"""

from __future__ import annotations

import altair as alt
import pandas as pd

KIND_COLOURS = alt.Scale(domain=["opens", "clicks"], range=["#4c78a8", "#f58518"])
EMPTY_TEXT = "Nothing in this range yet"


def _empty(message: str = EMPTY_TEXT) -> alt.Chart:
    """A placeholder of the same size, so the page does not jump."""
    return (
        alt.Chart(pd.DataFrame({"text": [message]}))
        .mark_text(size=14, color="#888")
        .encode(text="text:N")
        .properties(height=220)
    )


def activity_over_time(frame: pd.DataFrame, zone: str) -> alt.Chart:
    """Opens and clicks per time bucket, as two lines in the users' zone."""
    if frame.empty:
        return _empty()
    data = frame.copy()
    data["bucket"] = (
        pd.to_datetime(data["bucket"], utc=True)
        .dt.tz_convert(zone)
        .dt.tz_localize(None)
    )
    data = data.melt(
        id_vars="bucket",
        value_vars=["opens", "clicks"],
        var_name="kind",
        value_name="count",
    )
    return (
        alt.Chart(data)
        .mark_line(point=True)
        .encode(
            x=alt.X("bucket:T", title=None),
            y=alt.Y("count:Q", title="Recipients"),
            color=alt.Color("kind:N", scale=KIND_COLOURS, title=None),
            tooltip=[
                alt.Tooltip("bucket:T", title="Time", format="%Y-%m-%d %H:%M"),
                "kind:N",
                "count:Q",
            ],
        )
        .properties(height=260)
    )


def _rate_bars(frame: pd.DataFrame, label: str, title: str) -> alt.Chart:
    """Open and click rates side by side, one group of bars per ``label``."""
    data = frame.melt(
        id_vars=[label, "sent"],
        value_vars=["open_rate", "click_rate"],
        var_name="rate",
        value_name="value",
    )
    data["rate"] = data["rate"].map({"open_rate": "opens", "click_rate": "clicks"})
    return (
        alt.Chart(data)
        .mark_bar()
        .encode(
            y=alt.Y(f"{label}:N", title=title, sort="-x"),
            x=alt.X("value:Q", title="Rate", axis=alt.Axis(format="%")),
            yOffset="rate:N",
            color=alt.Color("rate:N", scale=KIND_COLOURS, title=None),
            tooltip=[
                f"{label}:N",
                "rate:N",
                alt.Tooltip("value:Q", format=".1%"),
                alt.Tooltip("sent:Q", title="Sent"),
            ],
        )
        .properties(height=alt.Step(14))
    )


def emailing_comparison(frame: pd.DataFrame) -> alt.Chart:
    """Open and click rate of each emailing in the range."""
    if frame.empty:
        return _empty()
    data = frame.copy()
    data["emailing"] = "#" + data["id"].astype(str) + " " + data["subject"].str[:40]
    return _rate_bars(data, "emailing", "Emailing")


def per_sequence(frame: pd.DataFrame) -> alt.Chart:
    """Open and click rate of the emailings each sequence created."""
    if frame.empty:
        return _empty()
    data = frame.copy()
    data["sequence"] = data["sequence"].fillna("(no sequence)")
    return _rate_bars(data, "sequence", "Sequence")


def top_links(frame: pd.DataFrame) -> alt.Chart:
    """The most clicked links: recipients who clicked each one."""
    if frame.empty:
        return _empty("No click in this range yet")
    return (
        alt.Chart(frame)
        .mark_bar(color="#f58518")
        .encode(
            y=alt.Y("url:N", title=None, sort="-x", axis=alt.Axis(labelLimit=420)),
            x=alt.X("clicks:Q", title="Clicks"),
            tooltip=["url:N", "clicks:Q", "recipients:Q"],
        )
        .properties(height=alt.Step(22))
    )
