#include "io/yaml_config.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <sstream>

#include <re2/re2.h>
#include <yaml-cpp/eventhandler.h>

#include "io/file_util.h"
#include "io/safetensors.h"

namespace llava::io {

namespace {

// ------------------------------------------------------------------------------------ bounded reading

// Nesting depth of YAML text, measured without parsing: block nesting by indentation (and "- " items on
// one line), flow nesting by brackets outside quotes and comments. Also refuses a second document.
// Fails at the first line deeper than kMaxYamlDepth.
class NestingScan {
 public:
  explicit NestingScan(std::string where) : where_(std::move(where)) {}

  void line(std::string_view text, int number) {
    if (!text.empty() && text.back() == '\r') text.remove_suffix(1);
    size_t indent = text.find_first_not_of(' ');
    if (indent == std::string_view::npos) return;  // blank
    if (block_scalar_indent_ >= 0) {               // the body of a | or > scalar is text, not structure
      if (static_cast<int>(indent) > block_scalar_indent_) return;
      block_scalar_indent_ = -1;
    }
    std::string_view rest = text.substr(indent);
    if (rest[0] == '#' || (indent == 0 && rest[0] == '%')) return;  // comment, directive
    if (indent == 0 && flow_depth_ == 0 && is_document_marker(rest)) {
      if (content_seen_) fail(where_, "line " + std::to_string(number) + ": a second YAML document ('" +
                                          std::string(rest.substr(0, 3)) + "'); a config is one document");
      if (rest.substr(0, 3) == "...") content_seen_ = true;
      rest = rest.substr(3);
      indent += 3;
      if (rest.find_first_not_of(' ') == std::string_view::npos) return;
    }
    content_seen_ = true;
    if (flow_depth_ == 0) {
      while (!indents_.empty() && indents_.back() >= indent) indents_.pop_back();
      indents_.push_back(indent);
      while (rest.size() >= 2 && (rest[0] == '-' || rest[0] == '?') && rest[1] == ' ') {  // "- - a": a level per dash
        const size_t next = rest.find_first_not_of(' ', 1);
        if (next == std::string_view::npos) break;
        indent += next;
        rest = rest.substr(next);
        indents_.push_back(indent);
        check(number);
      }
    }
    scan_flow(rest, number);
    check(number);
    const size_t end = rest.find_last_not_of(' ');
    if (flow_depth_ == 0 && end != std::string_view::npos && (rest[end] == '|' || rest[end] == '>' ||
                                                               (end > 0 && (rest[end - 1] == '|' || rest[end - 1] == '>'))))
      block_scalar_indent_ = static_cast<int>(indents_.empty() ? 0 : indents_.back());
  }

 private:
  static bool is_document_marker(std::string_view rest) {
    return (rest.substr(0, 3) == "---" || rest.substr(0, 3) == "...") && (rest.size() == 3 || rest[3] == ' ' || rest[3] == '\t');
  }

  void scan_flow(std::string_view rest, int number) {
    char quote = 0;
    char previous = ' ';
    for (size_t i = 0; i < rest.size(); ++i) {
      const char ch = rest[i];
      if (quote) {
        if (quote == '"' && ch == '\\') ++i;
        else if (ch == quote) quote = 0;
      } else if (ch == '#' && (previous == ' ' || previous == '\t')) {
        return;
      } else if ((ch == '"' || ch == '\'') && std::string_view(" \t[{,:-").find(previous) != std::string_view::npos) {
        quote = ch;
      } else if (ch == '[' || ch == '{') {
        ++flow_depth_;
        check(number);
      } else if ((ch == ']' || ch == '}') && flow_depth_ > 0) {
        --flow_depth_;
      }
      previous = ch;
    }
  }

  void check(int number) {
    const int depth = static_cast<int>(indents_.size()) + flow_depth_;
    if (depth > kMaxYamlDepth)
      fail(where_, "line " + std::to_string(number) + ": nested more than " + std::to_string(kMaxYamlDepth) +
                       " levels deep (a config is at most 3); refusing to parse it");
  }

  std::string where_;
  std::vector<size_t> indents_;  // block nesting: the indentation of each open level
  int flow_depth_ = 0;           // open [ and { (they may span lines)
  int block_scalar_indent_ = -1;
  bool content_seen_ = false;
};

void check_nesting(const std::string& text, const std::string& where) {
  NestingScan scan(where);
  int number = 1;
  size_t start = 0;
  while (start <= text.size()) {
    size_t end = text.find('\n', start);
    if (end == std::string::npos) end = text.size();
    scan.line(std::string_view(text).substr(start, end - start), number++);
    start = end + 1;
  }
}

int line_of(const YAML::Node& node) { return node.Mark().line + 1; }

// yaml-cpp keeps both entries of a key given twice; refuse that in every map, with both lines. Aliases
// share nodes, so the walk is bounded in depth (an alias may contain itself) and in nodes visited.
void check_unique_keys(const YAML::Node& node, const std::string& where, int depth, size_t& visited) {
  if (++visited > 100000) fail(where, "more than 100000 values (aliases that expand too far?)");
  if (depth > kMaxYamlDepth)
    fail(where, "nested more than " + std::to_string(kMaxYamlDepth) + " levels deep (an alias that contains itself?)");
  if (node.IsSequence()) {
    for (const auto& item : node) check_unique_keys(item, where, depth + 1, visited);
  } else if (node.IsMap()) {
    std::map<std::string, int> first_line;
    for (const auto& entry : node) {
      if (entry.first.IsScalar()) {
        auto [it, fresh] = first_line.emplace(entry.first.Scalar(), line_of(entry.first));
        if (!fresh)
          fail(where, "line " + std::to_string(line_of(entry.first)) + ": key '" + entry.first.Scalar() +
                          "' given twice (first at line " + std::to_string(it->second) + ")");
      }
      check_unique_keys(entry.second, where, depth + 1, visited);
    }
  }
}

std::string yaml_message(const YAML::Exception& e) {
  return e.msg + (e.mark.is_null() ? "" : " at line " + std::to_string(e.mark.line + 1) + ", column " +
                                              std::to_string(e.mark.column + 1));
}

bool is_scalar(const YAML::Node& n) { return n.IsDefined() && n.IsScalar(); }

// A YAML scalar as a double: yaml-cpp's conversion, but .nan / .inf are no setting's value.
bool to_double(const YAML::Node& n, double& out) {
  if (!is_scalar(n)) return false;
  try {
    out = n.as<double>();
  } catch (const YAML::Exception&) {
    return false;
  }
  return std::isfinite(out);
}

std::string format_number(double x) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.10g", x);
  return buf;
}

size_t edit_distance(const std::string& a, const std::string& b) {
  std::vector<size_t> row(b.size() + 1);
  for (size_t j = 0; j <= b.size(); ++j) row[j] = j;
  for (size_t i = 1; i <= a.size(); ++i) {
    size_t diagonal = row[0];
    row[0] = i;
    for (size_t j = 1; j <= b.size(); ++j) {
      const size_t up = row[j];
      row[j] = std::min({row[j] + 1, row[j - 1] + 1, diagonal + (a[i - 1] != b[j - 1])});
      diagonal = up;
    }
  }
  return row[b.size()];
}

}  // namespace

std::string printable(const std::string& text) {
  std::string out;
  for (unsigned char ch : text) {
    if (ch == '\n') out += "\\n";
    else if (ch < 0x20 || ch == 0x7f) out += '?';
    else out += static_cast<char>(ch);
  }
  return out;
}

// Where the text's second document starts (its 1-based line), or 0 when it has one document. A parser
// that only counts documents: yaml-cpp's LoadAll loops forever on some malformed text (e.g. ",a: m\n---.b"
// yields empty documents without consuming input), so no more than two documents are ever asked for.
int second_document_line(const std::string& text) {
  struct DocumentStarts : YAML::EventHandler {
    int line = 0;
    void OnDocumentStart(const YAML::Mark& mark) override { line = mark.line + 1; }
    void OnDocumentEnd() override {}
    void OnNull(const YAML::Mark&, YAML::anchor_t) override {}
    void OnAlias(const YAML::Mark&, YAML::anchor_t) override {}
    void OnScalar(const YAML::Mark&, const std::string&, YAML::anchor_t, const std::string&) override {}
    void OnSequenceStart(const YAML::Mark&, const std::string&, YAML::anchor_t, YAML::EmitterStyle::value) override {}
    void OnSequenceEnd() override {}
    void OnMapStart(const YAML::Mark&, const std::string&, YAML::anchor_t, YAML::EmitterStyle::value) override {}
    void OnMapEnd() override {}
  } starts;
  std::istringstream in(text);
  YAML::Parser parser(in);
  if (!parser.HandleNextDocument(starts)) return 0;
  return parser.HandleNextDocument(starts) ? std::max(starts.line, 1) : 0;
}

YAML::Node parse_yaml_text(const std::string& text, const std::string& where) {
  check_nesting(text, where);
  YAML::Node document;
  try {
    if (const int line = second_document_line(text))
      fail(where, "line " + std::to_string(line) + ": a second YAML document; a config is one document");
    document = YAML::Load(text);
  } catch (const YAML::Exception& e) {  // DeepRecursion included, should the scan above miss a shape
    fail(where, "not valid YAML: " + yaml_message(e));
  }
  size_t visited = 0;
  check_unique_keys(document, where, 0, visited);
  return document;
}

YAML::Node load_yaml_config(const std::string& path) { return parse_yaml_text(read_input_file(path, InputKind::kYamlConfig), path); }

std::string describe_value(const YAML::Node& node) {
  if (node.IsSequence()) return "a list";
  if (node.IsMap()) return "a map";
  if (node.IsNull()) return "nothing";
  std::string s = printable(node.Scalar());
  if (s.size() > 80) s = s.substr(0, 77) + "...";
  return "'" + s + "'";
}

// ------------------------------------------------------------------------------------------ value readers

bool read_bool(const YAML::Node& n) {
  static const std::set<std::string> truthy = {"true", "True"}, falsy = {"false", "False"};
  if (is_scalar(n) && truthy.count(n.Scalar())) return true;
  if (is_scalar(n) && falsy.count(n.Scalar())) return false;
  throw BadValue{"true or false"};
}

int64_t read_integer(const YAML::Node& n, int64_t min, int64_t max) {
  const std::string expected = "an integer in [" + std::to_string(min) + ", " + std::to_string(max) + "]";
  double value = 0;
  if (!to_double(n, value) || value != std::floor(value) || value < static_cast<double>(min) ||
      value > static_cast<double>(max))
    throw BadValue{expected};
  return static_cast<int64_t>(value);
}

double read_number(const YAML::Node& n, double min, double max, bool max_excluded) {
  const std::string expected = "a number in [" + format_number(min) + ", " + format_number(max) + (max_excluded ? ")" : "]");
  double value = 0;
  if (!to_double(n, value) || value < min || value > max || (max_excluded && value == max)) throw BadValue{expected};
  return value;
}

std::string read_string(const YAML::Node& n) {
  if (!is_scalar(n)) throw BadValue{"a string"};
  return n.Scalar();
}

std::string read_choice(const YAML::Node& n, const std::vector<std::string>& choices) {
  if (is_scalar(n) && std::find(choices.begin(), choices.end(), n.Scalar()) != choices.end()) return n.Scalar();
  std::string list;
  for (const auto& c : choices) list += (list.empty() ? "" : ", ") + c;
  throw BadValue{(choices.size() == 1 ? "" : "one of ") + list};
}

std::vector<std::string> read_strings(const YAML::Node& n) {
  if (is_scalar(n)) return {n.Scalar()};
  std::vector<std::string> out;
  if (n.IsSequence()) {
    for (const auto& item : n) {
      if (!is_scalar(item)) throw BadValue{"a string or a list of strings"};
      out.push_back(item.Scalar());
    }
    return out;
  }
  throw BadValue{"a string or a list of strings"};
}

std::string read_byte_size(const YAML::Node& n) {
  const BadValue bad{"a size like 5GB, 200MB or 1000 (bytes)"};
  if (!is_scalar(n)) throw bad;
  try {
    parse_size(n.Scalar());
  } catch (const Error&) {
    throw bad;
  }
  return n.Scalar();
}

std::string read_regex(const YAML::Node& n) {
  if (!is_scalar(n)) throw BadValue{"a regular expression"};
  const std::string& pattern = n.Scalar();
  if (pattern.size() > 1000) throw BadValue{"a regular expression of at most 1000 characters"};
  RE2::Options options;
  options.set_log_errors(false);
  const RE2 compiled(pattern, options);
  if (!compiled.ok())
    throw BadValue{"a regular expression in RE2 syntax (Python's re without backreferences or lookaround): " +
                   compiled.error()};
  return pattern;
}

// ------------------------------------------------------------------------------------------------ schema

std::vector<Setting> settings_of(const YAML::Node& root, const std::string& file, const std::set<std::string>& map_keys) {
  if (!root.IsMap()) fail(file, root.IsNull() ? "empty config (expected a YAML map of settings)" : "expected a YAML map of settings");
  std::vector<Setting> out;
  std::map<std::string, std::string> first_where;
  auto add = [&](const std::string& key, const YAML::Node& value, const YAML::Node& key_node) {
    const std::string where = file + ":" + std::to_string(line_of(key_node));
    if (auto [it, fresh] = first_where.emplace(key, where); !fresh)
      fail(where, "key '" + key + "' given twice (first at " + it->second + ")");
    out.push_back({key, value, where});
  };
  for (const auto& entry : root) {
    if (!entry.first.IsScalar())
      fail(file + ":" + std::to_string(line_of(entry.first)), "expected a key name, got " + describe_value(entry.first));
    const std::string key = entry.first.Scalar();
    if (!map_keys.count(key)) {
      add(key, entry.second, entry.first);
      continue;
    }
    if (entry.second.IsNull()) continue;
    if (!entry.second.IsMap())
      fail(file + ":" + std::to_string(line_of(entry.first)),
           "key '" + key + "': expected a map of " + key + ".* settings, got " + describe_value(entry.second));
    for (const auto& inner : entry.second) {
      if (!inner.first.IsScalar())
        fail(file + ":" + std::to_string(line_of(inner.first)), "expected a key name, got " + describe_value(inner.first));
      add(key + "." + inner.first.Scalar(), inner.second, inner.first);
    }
  }
  return out;
}

Setting setting_from_override(const std::string& text) {
  std::string shown = printable(text);
  if (shown.size() > 80) shown = shown.substr(0, 77) + "...";
  const std::string where = "--set " + shown;
  const size_t eq = text.find('=');
  if (eq == std::string::npos || eq == 0) fail(where, "expected key=value (e.g. --set learning_rate=1e-4)");
  const std::string key = text.substr(0, eq);
  // An empty value would be YAML null, which every key reads as "not given": the file's value would stay
  // in force while the command line seemed to change it.
  const std::string value = text.substr(eq + 1);
  if (value.find_first_not_of(" \t") == std::string::npos)
    fail(where, "expected a value after '=' (an empty one would leave the file's " + key + " in force)");
  return {key, parse_yaml_text(value, where), where};
}

std::string nearest_name(const std::string& key, const std::vector<std::string>& names) {
  std::string best;
  size_t best_distance = std::max<size_t>(3, key.size() / 3) + 1;
  for (const auto& candidate : names) {
    const size_t d = edit_distance(key, candidate);
    if (d < best_distance) best = candidate, best_distance = d;
  }
  return best;
}

}  // namespace llava::io
