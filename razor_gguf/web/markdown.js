// A small Markdown subset rendered to HTML without ever passing the input through as markup.
// The model's output is untrusted: every character of it is HTML-escaped first, and only fixed tags are
// added around the escaped text (fenced and inline code, headings, lists, bold, italic, links to http(s)
// URLs). Nothing the input contains can open a tag or an attribute.
"use strict";

const RazorMarkdown = (() => {
  function escapeHtml(s) {
    return s.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;")
            .replace(/"/g, "&quot;").replace(/'/g, "&#39;");
  }

  // inline spans of an already escaped line; code spans are cut out first so their contents stay literal
  function inline(escaped) {
    const parts = escaped.split(/(`[^`]+`)/g);
    return parts.map((p, i) => {
      if (i % 2 === 1) {
        return "<code>" + p.slice(1, -1) + "</code>";
      }
      return p
        .replace(/\*\*([^*]+)\*\*/g, "<strong>$1</strong>")
        .replace(/(^|[^*])\*([^*\s][^*]*)\*/g, "$1<em>$2</em>")
        // the URL is escaped text (no quote can survive), and only http(s) is linked
        .replace(/\[([^\]]+)\]\((https?:\/\/[^\s)]+)\)/g,
                 '<a href="$2" target="_blank" rel="noopener noreferrer nofollow">$1</a>');
    }).join("");
  }

  function render(text) {
    const lines = String(text).split("\n");
    const out = [];
    let para = [];
    let list = null; // "ul" | "ol"
    const flushPara = () => {
      if (para.length) {
        out.push("<p>" + para.map(inline).join("<br>") + "</p>");
        para = [];
      }
    };
    const closeList = () => {
      if (list) {
        out.push("</" + list + ">");
        list = null;
      }
    };
    for (let i = 0; i < lines.length; i++) {
      const raw = lines[i];
      const fence = raw.match(/^\s*```\s*([\w+-]*)\s*$/);
      if (fence) {
        flushPara();
        closeList();
        const body = [];
        i++;
        while (i < lines.length && !/^\s*```\s*$/.test(lines[i])) {
          body.push(lines[i]);
          i++;
        }
        const lang = fence[1] ? ' class="language-' + escapeHtml(fence[1]) + '"' : "";
        out.push("<pre><code" + lang + ">" + escapeHtml(body.join("\n")) + "</code></pre>");
        continue;
      }
      const line = escapeHtml(raw);
      const heading = line.match(/^(#{1,6})\s+(.*)$/);
      const bullet = line.match(/^\s*[-*+]\s+(.*)$/);
      const numbered = line.match(/^\s*\d+[.)]\s+(.*)$/);
      if (heading) {
        flushPara();
        closeList();
        const n = heading[1].length;
        out.push("<h" + n + ">" + inline(heading[2]) + "</h" + n + ">");
      } else if (bullet || numbered) {
        flushPara();
        const kind = bullet ? "ul" : "ol";
        if (list !== kind) {
          closeList();
          out.push("<" + kind + ">");
          list = kind;
        }
        out.push("<li>" + inline((bullet || numbered)[1]) + "</li>");
      } else if (line.trim() === "") {
        flushPara();
        closeList();
      } else {
        closeList();
        para.push(line);
      }
    }
    flushPara();
    closeList();
    return out.join("");
  }

  return { render, escapeHtml };
})();
