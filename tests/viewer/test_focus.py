"""The viewer's keyboard shortcuts work right after load, with no click first (headless Chromium)."""

from __future__ import annotations

import pytest

from tests.viewer.test_browser import Session, browser  # noqa: F401  (the module-scoped Chromium fixture)

pytestmark = pytest.mark.browser

FOCUSED = "() => document.activeElement === window.vitscopeViewers[0].root"


def test_shortcuts_work_on_load_without_a_click(browser, small_page):  # noqa: F811
    s = Session(browser, small_page.path)
    try:
        assert s.page.evaluate(FOCUSED)  # the viewer holds the focus as soon as it is mounted
        before = s.current()
        assert (before["layer"], before["mask"]) == (1, None)
        s.page.keyboard.press("ArrowLeft")  # previous layer, straight after load
        assert s.current()["layer"] == 0
        s.page.keyboard.press("m")  # mask on
        assert s.current()["mask"] is not None
        s.page.keyboard.press("ArrowDown")  # head mean -> max
        assert s.current()["head"] == "max"
        s.clean()
    finally:
        s.page.close()


def test_shortcuts_still_work_after_a_click_on_the_page_background(browser, small_page):  # noqa: F811
    s = Session(browser, small_page.path)
    try:
        s.page.evaluate("() => document.activeElement.blur()")  # as after a click outside the viewer
        assert s.page.evaluate("() => document.activeElement === document.body")
        s.page.keyboard.press("ArrowLeft")
        assert s.current()["layer"] == 0
        s.clean()
    finally:
        s.page.close()
