#pragma once
#include <string>
namespace specee {
std::string sha256_file(const std::string& path);  // lowercase hex; throws specee::Error if unreadable
}
