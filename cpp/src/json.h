// A small JSON reader (objects, arrays, strings, numbers, true/false/null) for manifest.json and the
// safetensors header. Numbers keep their double value (strtod: the exact double Python wrote).
#pragma once
#include <map>
#include <memory>
#include <string>
#include <vector>

namespace specee::json {

struct Value {
  enum Kind { Null, Bool, Number, String, Array, Object } kind = Null;
  bool b = false;
  double num = 0;
  std::string str;
  std::vector<Value> arr;
  std::map<std::string, Value> obj;

  bool has(const std::string& k) const { return kind == Object && obj.count(k) > 0; }
  const Value& at(const std::string& k) const;  // throws specee::Error naming the key
  double number() const;
  long long integer() const;
  const std::string& string() const;
};

Value parse(const std::string& text);  // throws specee::Error("... at offset N")
std::string quote(const std::string& s);

}  // namespace specee::json
