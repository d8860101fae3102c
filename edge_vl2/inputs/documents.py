"""Documents as page images: PDF (pypdfium2) and multi-page TIFF (Pillow), each page rendered for the tile grid.

A page is rendered at the size the processor will use it at, not at a printer's DPI: the candidate grid that holds
the page's aspect ratio at the largest area (model-facts §3.3's rule, on the processor's own candidates, so a device
profile's tile cap counts), and the page scaled to fit it. Rendering larger would only be scaled down again; smaller
would waste tiles. Every bad document (missing, encrypted, damaged, no pages, too many pages, a page range that is
not in it) is a one-line UserError naming the file.
"""

from __future__ import annotations

import mmap
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from PIL import Image

from ..errors import UserError, one_line
from .images import MAX_IMAGE_PIXELS

# Without --pages, a document longer than this is refused: at tens of seconds per page on a kiosk CPU, a 500-page
# file is almost always a mistake, and the user can still ask for any range of it.
MAX_PAGES = 100
PDF_POINTS_PER_INCH = 72


@dataclass(frozen=True)
class Page:
    number: int  # 1-based, as the user counts
    image: Image.Image  # RGB, rendered for the tile grid


def fit_size(size: tuple[float, float], candidates) -> tuple[int, int]:
    """Pixel size to render a (width, height) page at: fitted, aspect kept, into the candidate (W, H) where the fit
    has the largest area (ties: the least padding, then list order), which is the grid the processor then picks."""
    w0, h0 = size
    if not (w0 > 0 and h0 > 0):
        raise UserError(f"page has no area ({w0} x {h0})")
    best, best_area, best_waste = None, -1.0, 0.0
    for W, H in candidates:
        s = min(W / w0, H / h0)
        area = (w0 * s) * (h0 * s)
        waste = W * H - area
        if area > best_area + 1e-6 or (abs(area - best_area) <= 1e-6 and waste < best_waste):
            best, best_area, best_waste = s, area, waste
    return max(1, int(w0 * best)), max(1, int(h0 * best))


def parse_pages(spec: str | None, count: int, name: str) -> list[int]:
    """1-based page numbers from "1-3,5" (None: all pages, refused past MAX_PAGES)."""
    if spec is None:
        if count > MAX_PAGES:
            raise UserError(f"{name}: {count} pages; choose at most {MAX_PAGES} with --pages (e.g. --pages 1-10)")
        return list(range(1, count + 1))
    ranges = []
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not m:
            raise UserError(f"--pages {spec!r}: expected page numbers and ranges such as 1-3,5")
        first, last = int(m.group(1)), int(m.group(2) or m.group(1))
        if not 1 <= first <= last:
            raise UserError(f"--pages {spec!r}: {part.strip()} is not a range of pages counted from 1")
        if last > count:
            raise UserError(f"--pages {spec!r}: {name} has {count} page{'s' * (count != 1)}")
        ranges.append((first, last))
    if sum(last - first + 1 for first, last in ranges) > MAX_PAGES:  # counted before any list is built
        raise UserError(f"--pages {spec!r}: more than {MAX_PAGES} pages at a time")
    return list(dict.fromkeys(p for first, last in ranges for p in range(first, last + 1)))  # in order, once each


class Document:
    """An open PDF or TIFF: `len(doc)` pages, `doc.render(numbers, candidates)` yields Page objects."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.name = str(path)
        if not self.path.is_file():
            raise UserError(f"{self.name}: document not found" if not self.path.exists() else
                            f"{self.name}: not a file")
        with open(self.path, "rb") as f:
            head = f.read(8)
        if head.startswith(b"%PDF"):
            self.kind, self._doc = "pdf", _open_pdf(self.path)
            self.page_count = len(self._doc)
        elif head[:4] in (b"II*\0", b"MM\0*", b"II+\0", b"MM\0+"):
            self.kind, self._doc = "tiff", _open_tiff(self.path)
            self.page_count = getattr(self._doc, "n_frames", 1)
        else:
            raise UserError(f"{self.name}: not a PDF or TIFF file (expected a document: .pdf, .tif)")
        if self.page_count < 1:
            raise UserError(f"{self.name}: the document has no pages")

    def __len__(self) -> int:
        return self.page_count

    def __enter__(self) -> "Document":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._doc.close()

    def render(self, numbers: list[int], candidates) -> Iterator[Page]:
        """The pages `numbers` (1-based), one at a time (only one page image is in memory at once)."""
        for n in numbers:
            if not 1 <= n <= self.page_count:
                raise UserError(f"{self.name}: no page {n} (it has {self.page_count})")
            try:
                image = self._pdf_page(n, candidates) if self.kind == "pdf" else self._tiff_page(n, candidates)
            except UserError:
                raise
            except Exception as e:  # pdfium / Pillow decoding errors inside a page
                raise UserError(f"{self.name}: page {n} cannot be rendered ({one_line(e)})") from None
            yield Page(n, image)

    def _pdf_page(self, n: int, candidates) -> Image.Image:
        page = self._doc[n - 1]
        try:
            w, h = page.get_size()  # points, /Rotate applied
            tw, th = fit_size((w, h), candidates)
            return page.render(scale=min(tw / w, th / h)).to_pil().convert("RGB")
        finally:
            page.close()

    def _tiff_page(self, n: int, candidates) -> Image.Image:
        self._doc.seek(n - 1)
        w, h = self._doc.size
        if w * h > MAX_IMAGE_PIXELS:
            raise UserError(f"{self.name}: page {n} is {w}x{h} = {w * h / 1e6:.0f} MP, over the "
                            f"{MAX_IMAGE_PIXELS / 1e6:.0f} MP limit")
        frame = self._doc.convert("RGB")
        size = fit_size((w, h), candidates)
        return frame.resize(size, Image.Resampling.LANCZOS) if size != (w, h) else frame


def _open_pdf(path: Path):
    try:
        import pypdfium2 as pdfium
        import pypdfium2.raw as pdfium_c
    except ImportError:
        raise UserError('PDF input needs pypdfium2: pip install "edge-vl2[documents]"') from None
    # pdfium sets its last-error code for most failures but not for a file with no pages, which then reports
    # whatever code an earlier failure left. Opening the empty path first sets "file access error"; the file was
    # just read, so that code after the real open means pdfium gave no reason: no pages.
    pdfium_c.FPDF_LoadDocument(b"", None)
    try:
        return pdfium.PdfDocument(str(path))
    except pdfium.PdfiumError as e:
        code = getattr(e, "err_code", None)
        if code == pdfium_c.FPDF_ERR_PASSWORD or (code == pdfium_c.FPDF_ERR_SECURITY and _contains(path, b"/Encrypt")):
            raise UserError(f"{path}: the PDF is encrypted (password-protected); decrypt it first") from None
        if code in (pdfium_c.FPDF_ERR_FILE, pdfium_c.FPDF_ERR_SUCCESS):
            raise UserError(f"{path}: the PDF has no pages (or no page tree)") from None
        raise UserError(f"{path}: damaged or not a PDF ({one_line(e)})") from None


def _open_tiff(path: Path):
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return Image.open(path)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise UserError(f"{path}: a page is too large, possible decompression bomb ({one_line(e)})") from None
    except Exception as e:
        raise UserError(f"{path}: damaged or unreadable TIFF ({one_line(e)})") from None


def _contains(path: Path, needle: bytes) -> bool:
    with open(path, "rb") as f:
        try:
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
                return m.find(needle) >= 0
        except ValueError:  # empty file
            return False
